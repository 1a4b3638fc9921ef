"""Replay output is pinned byte for byte (tests/golden.py): three recordings from the real
kernel (a loopback run, the whole kernel tier's session tracer, a 20k conn/s storm), each in
every output mode. A change of layout must not change a byte; an intended change of output is
re-pinned with `python tests/golden.py write` after reviewing `golden.py diff --against`."""
import pytest

import golden           # tests/, on the path by tests/conftest.py


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    d = tmp_path_factory.mktemp("recordings")
    return {name: golden.recording_path(name, str(d)) for name in golden.RECORDINGS}


@pytest.mark.parametrize("mode", sorted(golden.MODES))
@pytest.mark.parametrize("name", golden.RECORDINGS)
def test_replay_output_is_the_pinned_one(unpacked, name, mode):
    want = golden.load()[f"{name} {mode}"]
    got = golden.digest(*golden.replay(unpacked[name], mode))
    assert got == want


def test_every_recording_and_mode_is_pinned():
    assert set(golden.load()) == {f"{n} {m}" for n in golden.RECORDINGS for m in golden.MODES}
