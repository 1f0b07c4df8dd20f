from dtrain.train.control import StepControl, clear_stop, clock_due, request_stop, stop_requested


def test_clock_due_only_after_the_interval_and_never_when_off():
    assert not clock_due(now=100.0, last_save=50.0, every_minutes=1.0)
    assert clock_due(now=110.0, last_save=50.0, every_minutes=1.0)
    assert not clock_due(now=1e9, last_save=0.0, every_minutes=0.0)


def test_step_control_sees_a_stop_request_and_the_clock(tmp_path):
    now = [0.0]
    control = StepControl(tmp_path, every_minutes=0.5, rank=0, clock=lambda: now[0])
    assert control.poll() == (False, False)
    now[0] = 31.0
    assert control.poll() == (False, True)
    control.saved()
    assert control.poll() == (False, False)
    request_stop(tmp_path, "SIGTERM")
    assert stop_requested(tmp_path) == "SIGTERM" and control.poll() == (True, False)
    clear_stop(tmp_path)
    assert stop_requested(tmp_path) is None and control.poll() == (False, False)


def test_only_rank_0_reads_the_request(tmp_path):
    """Other ranks take rank 0's verdict through the broadcast; alone, they never stop on their own."""
    request_stop(tmp_path, "SIGINT")
    assert StepControl(tmp_path, every_minutes=0.0, rank=1).poll() == (False, False)
