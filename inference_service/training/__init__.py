"""Training: the synthetic pose–language corpus and the code that fine-tunes ChatPose.

``joint_limits``, ``actions``, ``captions`` and ``corpus`` need only numpy. Modules that need
torch are imported explicitly by their users; this package imports nothing on its own.
"""
