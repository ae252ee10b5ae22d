"""The escalation state machine on its own: what a consult hands over and who acts next."""

from advisor.escalation import ConsultOutcome, EscalationPolicy, TurnState
from advisor.task import Escalation


def test_takeover_steps_pass_to_the_frontier_then_back_to_the_executor():
    policy = EscalationPolicy(Escalation(mode="takeover", takeover_steps=2, max_consults=3))
    turn = TurnState()
    outcome = policy.begin_consult("failures", spent=0.0, estimate=0.01, max_usd=1.0)
    assert outcome == ConsultOutcome("takeover", takeover_steps=2)
    turn.apply(outcome)
    assert [turn.start_step(has_frontier=True) for _ in range(4)] == [
        (True, False),
        (True, False),
        (False, True),  # the executor takes the turn back, once
        (False, False),
    ]
    assert policy.consults == 1 and policy.notes_handback


def test_a_final_review_asks_for_advice_even_in_takeover_mode():
    policy = EscalationPolicy(Escalation(mode="restart", at=["final"]))
    assert policy.begin_consult("final", 0.0, 0.01, 1.0) is None  # ask the frontier
    assert policy.advised("final", "APPROVE: fine").kind == "approved"
    assert policy.advised("final", "The sum is wrong").kind == "objected"
    assert policy.advised("failures", "APPROVE").kind == "advice"
    assert not policy.notes_handback


def test_skips_are_counted_and_end_a_takeover_in_progress():
    policy = EscalationPolicy(Escalation(mode="takeover", max_consults=1))
    turn = TurnState(takeover_left=3)
    policy.consecutive = 2
    assert policy.begin_consult("failures", 0.0, 2.0, 1.0) == ConsultOutcome("skipped", skip_reason="budget")
    assert policy.consecutive == 2  # a skipped consult leaves the streak as it was
    assert policy.begin_consult("failures", 0.0, 0.1, 1.0).kind == "takeover"
    assert policy.consecutive == 0
    skipped = policy.begin_consult("failures", 0.0, 0.1, 1.0)
    assert skipped.skip_reason == "max_consults" and policy.skipped == 2
    turn.apply(skipped)
    assert turn.takeover_left == 0


def test_no_frontier_means_the_executor_acts_whatever_is_left():
    turn = TurnState(takeover_left=1)
    assert turn.start_step(has_frontier=False) == (False, False)
    assert turn.takeover_left == 0


def test_failure_signals_choose_what_counts():
    from advisor.trace import Trace

    class Sink(Trace):
        def __init__(self):
            self.events = []

        def emit(self, type_, **fields):
            self.events.append((type_, fields))

    trace = Sink()
    policy = EscalationPolicy(Escalation(after_failures=2, failure_signals=["tool_error", "check_failed"]))
    assert policy.counts("tool_error") and policy.counts("unknown_tool") and policy.counts("check_rejected")
    assert policy.counts("no_progress")  # an empty reply is not one of the four: it always counts
    assert not policy.counts("nonzero_exit") and not policy.counts("repeated_call")
    assert policy.failure(1, "nonzero_exit", "exit 1", trace) is False and policy.consecutive == 0
    assert policy.failure(2, "tool_error", "boom", trace) is False and policy.consecutive == 1
    assert policy.failure(3, "check_rejected", "red", trace) is True
    assert [f["reason"] for t, f in trace.events if t == "step_failed"] == ["tool_error", "check_rejected"]
    assert Escalation().failure_signals == ["tool_error", "nonzero_exit", "repeated_call", "check_failed"]


def test_a_change_to_the_workspace_forgets_failed_calls():
    policy = EscalationPolicy(Escalation())
    policy.remember_failed("shell{pytest}")
    assert policy.repeated("shell{pytest}")
    policy.forget_failed()  # e.g. edit_file succeeded: the same test run is worth making again
    assert not policy.repeated("shell{pytest}")
