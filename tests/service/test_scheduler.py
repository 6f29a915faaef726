"""The scheduler on its own: no sockets, a scripted backend, replies collected in a list."""

from __future__ import annotations

import threading
import time
import weakref

import pytest

from inference_service import scheduler as scheduler_module
from inference_service.errors import ModelError, UnsupportedInputError
from inference_service.scheduler import Answer, Scheduler
from shared_protocol.protocol import (
    BatchDoneReply,
    BatchItemReply,
    BatchRequest,
    ErrorCode,
    ErrorReply,
    PoseReply,
    PoseRequest,
)

from .scripted_backend import TIMEOUT_S, ScriptedBackend, pose_for, wait_until


class Collected:
    def __init__(self) -> None:
        self.replies: list[tuple[bytes, object]] = []
        self._changed = threading.Condition()

    def __call__(self, client: bytes, reply: object) -> None:
        with self._changed:
            self.replies.append((client, reply))
            self._changed.notify_all()

    def wait_for(self, predicate, timeout_s: float = TIMEOUT_S) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self.of()), timeout_s), self.replies

    def of(self, client: bytes | None = None) -> list:
        return [r for c, r in self.replies if client is None or c == client]


class RecordingBackend(ScriptedBackend):
    """Also records which prompts each micro-batch held."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[list[str]] = []

    def answer_poses(self, items):
        self.groups.append([item.prompt for item in items])
        return super().answer_poses(items)


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
def collected() -> Collected:
    return Collected()


def make(backend, collected, **options) -> Scheduler:
    scheduler = Scheduler(backend, collected, **options)
    scheduler.start()
    return scheduler


def test_a_long_batch_does_not_starve_another_client(backend, collected):
    scheduler = make(backend, collected, max_batch=4, max_wait_ms=0)
    backend.hold()
    scheduler.submit_batch(b"A", BatchRequest("a", [f"a{i}" for i in range(40)]))
    assert backend.entered.wait(TIMEOUT_S)
    scheduler.submit_pose(b"B", PoseRequest("b", "b's only prompt"))
    backend.release()
    collected.wait_for(lambda rs: any(isinstance(r, BatchDoneReply) for r in rs))
    assert backend.groups[0] == ["a0", "a1", "a2", "a3"]
    assert "b's only prompt" in backend.groups[1], backend.groups
    assert collected.of(b"B") == [
        PoseReply("b", collected.of(b"B")[0].text, (pose_for("b's only prompt"),))
    ]
    assert sorted(r.index for r in collected.of(b"A") if isinstance(r, BatchItemReply)) == list(
        range(40)
    )
    scheduler.stop()


def test_many_pose_requests_from_one_client_do_not_starve_another(backend, collected):
    # A script with 40 pose requests in flight: another client's one is in the next
    # micro-batch, not behind all 40.
    scheduler = make(backend, collected, max_batch=4, max_wait_ms=0)
    backend.hold()
    for i in range(40):
        scheduler.submit_pose(b"A", PoseRequest(f"a{i}", f"a{i}"))
    assert backend.entered.wait(TIMEOUT_S)
    scheduler.submit_pose(b"B", PoseRequest("b", "b's only prompt"))
    backend.release()
    collected.wait_for(lambda rs: len(rs) == 41)
    assert "b's only prompt" in backend.groups[1], backend.groups
    assert [p for group in backend.groups for p in group if p != "b's only prompt"] == [
        f"a{i}" for i in range(40)
    ]  # A's own in the order it sent them
    scheduler.stop()


def _answered_once_released(backend, collected, count: int) -> list[str]:
    """The ids of the replies, in the order they came, once the held backend has answered
    ``count`` requests."""
    backend.release()
    collected.wait_for(lambda rs: len(rs) == count)
    return [reply.id for reply in collected.of()]


def test_many_chat_turns_from_one_client_do_not_starve_another(backend, collected):
    # A review: chat tasks were taken first in, first out, so a script's 300 chat turns in
    # flight held every other client behind all of them (seconds each on a 13B model).
    scheduler = make(backend, collected, max_batch=4, max_wait_ms=0)
    backend.hold()
    for i in range(20):
        scheduler.submit_pose(b"A", PoseRequest(f"a{i}", f"a{i}", mode="chat"))
    assert backend.entered.wait(TIMEOUT_S)  # A's first turn runs
    scheduler.submit_pose(b"B", PoseRequest("b", "b's only prompt"))
    scheduler.submit_pose(b"C", PoseRequest("c", "c's turn", mode="chat"))
    order = _answered_once_released(backend, collected, 22)
    assert order[:3] == ["a0", "b", "c"], order  # each after the one turn that ran
    assert [i for i in order if i.startswith("a")] == [f"a{i}" for i in range(20)]
    scheduler.stop()


def test_clients_that_wait_for_each_answer_do_not_starve_one_with_work_queued(collected):
    # The diff review: a client with nothing queued between two requests lost its turn's
    # record, came first on its next, and two such clients shut out a third's queued turns.
    answered: list[str] = []
    next_turn = {b"C": 0, b"D": 0}
    on_the_way: list[tuple[bytes, str]] = []  # sent once answered; here while the next runs

    class Asking(RecordingBackend):
        def answer_chat(self, item, stop=None):
            while on_the_way:
                client, turn = on_the_way.pop(0)
                scheduler.submit_pose(client, PoseRequest(turn, turn, mode="chat"))
            return super().answer_chat(item, stop=stop)

    def ask_again(client: bytes, reply) -> None:  # C and D send their next turn once answered
        collected(client, reply)
        answered.append(reply.id)
        if client in next_turn and next_turn[client] < 30:
            next_turn[client] += 1
            on_the_way.append((client, f"{client.decode()}{next_turn[client]}"))

    backend = Asking()
    scheduler = make(backend, ask_again, max_batch=4, max_wait_ms=0)
    backend.hold()
    scheduler.submit_pose(b"C", PoseRequest("C0", "C0", mode="chat"))
    assert backend.entered.wait(TIMEOUT_S)
    scheduler.submit_pose(b"D", PoseRequest("D0", "D0", mode="chat"))
    for i in range(3):
        scheduler.submit_pose(b"A", PoseRequest(f"A{i}", f"A{i}", mode="chat"))
    backend.release()
    collected.wait_for(lambda rs: len(rs) == 65)
    # A's turns come in turn with theirs, not after all 62 of them.
    assert [answered.index(f"A{i}") for i in range(3)] == [2, 5, 8], answered[:10]
    scheduler.stop()


def test_a_chat_turn_waits_for_no_more_than_the_clients_that_came_before_it(collected):
    # The soak review: each new connection (every command line is one) counted as never
    # served and came first, so a chat turn, which runs only when it is picked, waited 40 s
    # while others kept connecting.
    arrivals = iter(range(10))

    class Churning(RecordingBackend):  # a new client connects during every micro-batch
        def answer_poses(self, items):
            if (i := next(arrivals, None)) is not None:
                scheduler.submit_pose(f"new{i}".encode(), PoseRequest(f"n{i}", f"n{i}"))
            return super().answer_poses(items)

    backend = Churning()
    scheduler = make(backend, collected, max_batch=1, max_wait_ms=0)
    backend.hold()
    scheduler.submit_pose(b"A", PoseRequest("a0", "a0"))
    assert backend.entered.wait(TIMEOUT_S)  # A's first turn runs; new0 connects
    scheduler.submit_pose(b"A", PoseRequest("a1", "a1", mode="chat"))
    order = _answered_once_released(backend, collected, 12)
    assert order[:3] == ["a0", "n0", "a1"], order  # after the one that came before it
    assert [i for i in order if i.startswith("n")] == [f"n{i}" for i in range(10)]
    scheduler.stop()


def test_a_client_keeps_its_turn_past_the_clients_kept_while_its_batch_is_in_flight(
    backend, collected, monkeypatch
):
    # The diff review: past MAX_TURNS_KEPT, a chat-mode batch's client, whose one queued task
    # had just been taken, was forgotten at its own turn, and then came after every other.
    monkeypatch.setattr(scheduler_module, "MAX_TURNS_KEPT", 8)
    scheduler = make(backend, collected, max_batch=1, max_wait_ms=0)
    backend.hold()
    scheduler.submit_batch(b"A", BatchRequest("a", [f"talk {i}" for i in range(4)], mode="chat"))
    assert backend.entered.wait(TIMEOUT_S)  # A's first turn runs
    for c in range(12):
        for k in range(3):
            scheduler.submit_pose(f"c{c}".encode(), PoseRequest(f"c{c}-{k}", f"c{c}-{k}"))
    backend.release()
    collected.wait_for(lambda rs: any(isinstance(r, BatchDoneReply) for r in rs))
    answers = [r for _, r in collected.replies if isinstance(r, PoseReply | BatchItemReply)]
    order = [f"a{r.index}" if isinstance(r, BatchItemReply) else r.id for r in answers]
    rounds = [[f"a{k}", *(f"c{c}-{k}" for c in range(12))] for k in range(3)]
    assert order == [name for turn in rounds for name in turn] + ["a3"]  # as with all kept
    assert len(scheduler._last_turn) <= 8
    scheduler.stop()


def test_a_chat_mode_batch_keeps_one_item_queued_so_another_client_waits_for_one_turn(
    backend, collected
):
    scheduler = make(backend, collected, max_batch=8, max_wait_ms=0)
    backend.hold()
    prompts = [f"talk {i}" for i in range(6)]
    scheduler.submit_batch(b"A", BatchRequest("a", prompts, mode="chat"))
    assert backend.entered.wait(TIMEOUT_S)  # A's first turn runs
    scheduler.submit_pose(b"B", PoseRequest("b", "b's only prompt"))
    backend.release()
    collected.wait_for(lambda rs: any(isinstance(r, BatchDoneReply) for r in rs))
    answers = [r for _, r in collected.replies if isinstance(r, PoseReply | BatchItemReply)]
    order = [r.index if isinstance(r, BatchItemReply) else r.id for r in answers]
    assert order.index("b") <= 2, order  # behind the running turn and at most one queued
    scheduler.stop()


def test_a_chat_mode_batch_item_cut_at_the_token_limit_says_so(backend, collected):
    scheduler = make(backend, collected, max_batch=8, max_wait_ms=0)
    scheduler.submit_batch(b"A", BatchRequest("a", ["ramble on", "sit"], mode="chat"))
    collected.wait_for(lambda rs: any(isinstance(r, BatchDoneReply) for r in rs))
    items = sorted(
        (r for _, r in collected.replies if isinstance(r, BatchItemReply)), key=lambda r: r.index
    )
    assert [item.truncated for item in items] == [True, False]
    scheduler.stop()


def test_cancel_client_drops_queued_and_waiting_work_silently(backend, collected):
    scheduler = make(backend, collected, max_batch=4, max_wait_ms=0)
    backend.hold()
    scheduler.submit_batch(b"gone", BatchRequest("x", [f"p{i}" for i in range(40)]))
    assert backend.entered.wait(TIMEOUT_S)
    scheduler.cancel_client(b"gone")
    assert scheduler.queue_depth == 0
    backend.release()
    scheduler.stop()
    assert backend.groups == [["p0", "p1", "p2", "p3"]]
    assert collected.of(b"gone") == []  # nobody is there to tell


def test_a_failing_batch_is_retried_item_by_item(backend, collected):
    scheduler = make(backend, collected, max_batch=3, max_wait_ms=50)
    scheduler.submit_batch(b"A", BatchRequest("a", ["left", "explode", "right"]))
    collected.wait_for(lambda rs: any(isinstance(r, BatchDoneReply) for r in rs))
    scheduler.stop()
    assert backend.groups == [["left", "explode", "right"], ["left"], ["explode"], ["right"]]
    replies = collected.of()
    assert {r.index for r in replies if isinstance(r, BatchItemReply)} == {0, 2}
    [error] = [r for r in replies if isinstance(r, ErrorReply)]
    assert (error.index, error.code) == (1, ErrorCode.MODEL_ERROR)
    assert replies[-1] == BatchDoneReply("a", total=3, completed=2)


class Activations:
    """Stands in for a forward pass's tensors: only the frames of the failed call hold it."""


class ExhaustedBackend(ScriptedBackend):
    """Runs out of memory on a batch of more than one, while its activations are alive; and
    records, at each one-by-one retry, whether the failed batch's are still held."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_batch: weakref.ref | None = None
        self.held_at_retry: list[bool] = []

    def answer_poses(self, items):
        if len(items) > 1:
            activations = Activations()
            self.failed_batch = weakref.ref(activations)
            raise ModelError("out of GPU memory: send fewer or shorter requests")
        self.held_at_retry.append(self.failed_batch() is not None)
        return super().answer_poses(items)


def test_the_one_by_one_retry_runs_after_the_failed_batch_lets_its_memory_go(collected):
    backend = ExhaustedBackend()
    scheduler = make(backend, collected, max_batch=3, max_wait_ms=50)
    scheduler.submit_batch(b"A", BatchRequest("a", ["left", "bow", "right"]))
    collected.wait_for(lambda rs: any(isinstance(r, BatchDoneReply) for r in rs))
    scheduler.stop()
    assert backend.held_at_retry == [False, False, False]
    assert collected.of()[-1] == BatchDoneReply("a", total=3, completed=3)


class MisbehavingBackend(ScriptedBackend):
    """A backend bug: `answers(items)` instead of one Answer per item."""

    def __init__(self, answers) -> None:
        super().__init__()
        self.answers = answers

    def answer_poses(self, items):
        return self.answers(items)


@pytest.mark.parametrize(
    ("answers", "said"),
    [
        (lambda items: [], "gave 0 answers for 1"),
        (lambda items: [None] * len(items), "gave a NoneType as an answer"),  # the count right
    ],
)
def test_a_misbehaving_backend_gives_model_errors_and_the_worker_lives_on(collected, answers, said):
    scheduler = make(MisbehavingBackend(answers), collected, max_batch=1, max_wait_ms=0)
    scheduler.submit_pose(b"A", PoseRequest("1", "first"))
    scheduler.submit_pose(b"A", PoseRequest("2", "second"))
    collected.wait_for(lambda rs: len(rs) == 2)
    scheduler.stop()
    assert [(r.id, r.code) for r in collected.of()] == [
        ("1", ErrorCode.MODEL_ERROR),
        ("2", ErrorCode.MODEL_ERROR),
    ]
    assert said in collected.of()[0].message


def test_an_item_the_backend_refuses_on_its_own_leaves_the_others_in_its_pass(collected):
    # An unknown-word line refused as the whole pass's error sent every line of its
    # micro-batch through the one-by-one retry: single-request speed for such a batch file.
    def refuse_the_odd(items):
        answers = ScriptedBackend.answer_poses(backend, items)
        return [
            UnsupportedInputError("prompt: unknown") if item.prompt.endswith("odd") else answer
            for item, answer in zip(items, answers, strict=True)
        ]

    backend = MisbehavingBackend(refuse_the_odd)
    backend.hold()
    scheduler = make(backend, collected, max_batch=4, max_wait_ms=0)
    scheduler.submit_pose(b"A", PoseRequest("first", "first"))
    assert backend.entered.wait(TIMEOUT_S)
    scheduler.submit_batch(b"B", BatchRequest("b", ["one", "two odd", "three", "four"]))
    backend.release()
    collected.wait_for(lambda rs: any(isinstance(r, BatchDoneReply) for r in rs))
    scheduler.stop()
    errors = [(r.index, r.code) for _, r in collected.replies if isinstance(r, ErrorReply)]
    assert errors == [(1, ErrorCode.UNSUPPORTED_INPUT)]
    assert backend.batch_sizes == [1, 4]  # "first", then the batch's four in one pass


class FailingClock:
    """Fails the next `failures` times the worker thread reads it: a stand-in for a bug in
    the scheduler itself."""

    def __init__(self) -> None:
        self.failures = 0

    def __call__(self) -> float:
        if self.failures and threading.current_thread().name == "chatpose-scheduler":
            self.failures -= 1
            raise OverflowError("timeout value is too large")
        return time.monotonic()


def test_a_scheduler_failing_for_good_neither_overflows_its_wait_nor_spins_when_stopped(
    backend, collected, monkeypatch
):
    # 2**1024 in the backoff raised inside the handler and killed the worker; once stopping,
    # the failing loop spun (34,818 tracebacks in half a second) until stop gave up on it.
    monkeypatch.setattr(scheduler_module, "FAILURE_BACKOFF_S", 0.0)  # the failures come fast
    clock = FailingClock()
    clock.failures = 2000
    scheduler = make(backend, collected, clock=clock)
    deadline = time.monotonic() + TIMEOUT_S
    while clock.failures > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert clock.failures == 0 and scheduler._worker.is_alive()  # past 1024 in a row
    clock.failures = 10**9  # failing for good
    started = time.monotonic()
    scheduler.stop(timeout_s=5.0)
    assert not scheduler._worker.is_alive() and time.monotonic() - started < 2.0


def test_a_base_exception_in_the_model_answers_internal_error_and_the_worker_lives_on(
    backend, collected, monkeypatch
):
    # A SystemExit or KeyboardInterrupt a library raises in the worker thread killed it: the
    # requests then waited for ever, and every later one timed out.
    scheduler = make(backend, collected, max_batch=1, max_wait_ms=0)
    real = backend.answer_poses

    def exiting(items):
        if any(item.prompt == "exit" for item in items):
            raise SystemExit(3)
        return real(items)

    monkeypatch.setattr(backend, "answer_poses", exiting)
    scheduler.submit_pose(b"A", PoseRequest("0", "exit"))
    collected.wait_for(lambda rs: len(rs) == 1)
    scheduler.submit_pose(b"B", PoseRequest("1", "wave"))
    collected.wait_for(lambda rs: len(rs) == 2)
    scheduler.stop()
    failed, answered = collected.of()
    assert (failed.id, failed.code) == ("0", ErrorCode.INTERNAL_ERROR)
    assert "SystemExit: 3" in failed.message
    assert answered == PoseReply("1", answered.text, (pose_for("wave"),))


def test_a_failure_in_the_scheduler_answers_internal_error_and_the_worker_lives_on(
    backend, collected
):
    clock = FailingClock()
    scheduler = make(backend, collected, max_batch=1, max_wait_ms=0, clock=clock)
    backend.hold()
    scheduler.submit_pose(b"A", PoseRequest("0", "running"))
    assert backend.entered.wait(TIMEOUT_S)
    scheduler.submit_pose(b"A", PoseRequest("1", "queued"))
    clock.failures = 1  # fails as the running micro-batch is timed, before it is delivered
    backend.release()
    collected.wait_for(lambda rs: len(rs) == 2)
    failed, answered = collected.of()
    assert (failed.id, failed.code) == ("0", ErrorCode.INTERNAL_ERROR)
    assert "OverflowError: timeout value is too large" in failed.message
    assert answered == PoseReply("1", answered.text, (pose_for("queued"),))

    # Failing before a task is taken off the queue (the worker reads the clock there under
    # the lock, so holding it makes the failures come after the submission), three times in
    # a row: the request waits in the queue, and the worker, once it recovers, answers it.
    with scheduler._lock:
        clock.failures = 3
        scheduler.submit_pose(b"A", PoseRequest("2", "waits"))
    collected.wait_for(lambda rs: len(rs) == 3)
    scheduler.stop()
    assert clock.failures == 0
    assert collected.of()[2] == PoseReply("2", collected.of()[2].text, (pose_for("waits"),))


def test_deadlines_follow_the_clock(backend, collected):
    now = [1000.0]
    scheduler = make(backend, collected, max_batch=1, max_wait_ms=0, clock=lambda: now[0])
    backend.hold()
    scheduler.submit_pose(b"A", PoseRequest("running", "first"))
    assert backend.entered.wait(TIMEOUT_S)
    scheduler.submit_pose(b"A", PoseRequest("patient", "second", timeout_ms=60_000))
    scheduler.submit_pose(b"A", PoseRequest("hurried", "third", timeout_ms=1_000))
    now[0] += 2.0
    scheduler.expire()
    assert [(r.id, r.code) for r in collected.of()] == [("hurried", ErrorCode.TIMEOUT)]
    backend.release()
    collected.wait_for(lambda rs: len(rs) == 3)
    scheduler.stop()
    assert {r.id for r in collected.of() if isinstance(r, PoseReply)} == {"running", "patient"}


def test_an_empty_batch_is_done_at_once(backend, collected):
    scheduler = make(backend, collected)
    scheduler.submit_batch(b"A", BatchRequest("empty", []))
    assert collected.of() == [BatchDoneReply("empty", total=0, completed=0)]
    scheduler.stop()


def test_stop_delivers_the_running_items_then_ends_the_batch(backend, collected):
    scheduler = make(backend, collected, max_batch=4, max_wait_ms=0)
    backend.hold()
    scheduler.submit_batch(b"A", BatchRequest("a", [f"p{i}" for i in range(10)]))
    assert backend.entered.wait(TIMEOUT_S)
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    wait_until(lambda: scheduler._stopping)  # stop() has begun, the first items still run
    backend.release()
    stopper.join(TIMEOUT_S)
    replies = collected.of()
    assert [r.index for r in replies[:-1]] == [0, 1, 2, 3]
    assert isinstance(replies[-1], ErrorReply) and replies[-1].code == ErrorCode.SHUTTING_DOWN
    assert replies[-1].index is None


def test_stop_answers_work_still_running_after_the_grace_time(backend, collected):
    scheduler = make(backend, collected, max_batch=4, max_wait_ms=0)
    backend.hold()
    scheduler.submit_pose(b"A", PoseRequest("slow", "hello"))
    assert backend.entered.wait(TIMEOUT_S)
    scheduler.stop(timeout_s=0.1)
    [reply] = collected.of()
    assert (reply.id, reply.code) == ("slow", ErrorCode.SHUTTING_DOWN)
    assert "still running after 0.1 s" in reply.message
    backend.release()  # the late answer is discarded
    scheduler._worker.join(TIMEOUT_S)  # it has come and gone
    assert len(collected.of()) == 1


def test_work_after_stop_is_refused(backend, collected):
    scheduler = make(backend, collected)
    scheduler.stop()
    scheduler.submit_pose(b"A", PoseRequest("late", "hello"))
    assert [(r.id, r.code) for r in collected.of()] == [("late", ErrorCode.SHUTTING_DOWN)]


def test_chat_mode_runs_alone_through_generation(backend, collected):
    scheduler = make(backend, collected, max_batch=8, max_wait_ms=30)
    scheduler.submit_pose(b"A", PoseRequest("c", "talk", mode="chat"))
    scheduler.submit_pose(b"A", PoseRequest("p", "pose"))
    collected.wait_for(lambda rs: len(rs) == 2)
    scheduler.stop()
    by_id = {r.id: r for r in collected.of()}
    assert by_id["c"].text.startswith("Here you go") and len(by_id["c"].poses) == 2
    assert backend.groups == [["pose"]]


class EndlessChat(ScriptedBackend):
    """Chat replies that go on until they are told to stop."""

    def answer_chat(self, item, stop=None):
        self.entered.set()
        deadline = time.monotonic() + TIMEOUT_S
        while not stop():
            assert time.monotonic() < deadline, "never told to stop"
            time.sleep(0.001)
        self.stopped = True
        return Answer("cut short", ())


def test_a_cancelled_chat_stops_generating_and_frees_the_model(collected):
    backend = EndlessChat()
    scheduler = make(backend, collected, max_batch=8, max_wait_ms=0)
    scheduler.submit_pose(b"A", PoseRequest("c", "tell me a long story", mode="chat"))
    assert backend.entered.wait(TIMEOUT_S)
    scheduler.cancel(b"A", "c")
    scheduler.submit_pose(b"B", PoseRequest("p", "wave"))  # served once the chat has let go
    collected.wait_for(lambda rs: len(rs) == 2)
    scheduler.stop()
    chat, pose = collected.of()
    assert (chat.id, chat.code, pose.id) == ("c", ErrorCode.CANCELLED, "p")
    assert backend.stopped


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_batch", 0), ("max_wait_ms", -1), ("max_wait_ms", float("inf")), ("max_wait_ms", 1e9)],
)
def test_bad_options_are_refused(backend, collected, option, value):
    with pytest.raises(ValueError, match=option):
        Scheduler(backend, collected, **{option: value})
