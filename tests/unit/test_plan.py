"""The planner's switches (kernel/probes.py: SWITCHES) against the C that reads them and the
plans it makes. tests/kernel/test_plans.py builds every option from the table; these checks
keep the table the only way a compile switch reaches the program, so that nothing escapes it."""
import dataclasses
import glob
import os
import re

import pytest

from tcptrace.kernel import loader, probes
from tcptrace.kernel.probes import SUPPORTED, UNSUPPORTED, Check

BPF = os.path.join(os.path.dirname(__file__), "..", "..", "bpf")
# What bpf/ tests with #ifdef besides the plan's switches: -D sizes with defaults, and the
# tests-only mode in which the rescue's twins take every hit.
NOT_PLAN = {"TT_SOCKS_MAX", "TT_HELD_MAX", "TT_AGG_MAX", "TT_RESCUE_ONLY"}


def c_switches():
    """Every macro bpf/ decides on with #ifdef or #ifndef."""
    out = set()
    for path in glob.glob(os.path.join(BPF, "*.[ch]")):
        with open(path) as f:
            out |= set(re.findall(r"^#\s*if(?:n?def)\s+(TT_\w+)", f.read(), re.M))
    return out


def table_switches():
    return {flag[2:].split("=")[0] for sw in probes.SWITCHES for o in sw.options
            for flag in o.cflags}


def test_every_switch_in_the_c_is_a_planner_option_and_every_option_is_read():
    assert c_switches() - NOT_PLAN == table_switches()


def machine(**status):
    """Checks of a machine with everything, but for `status` (check name -> status)."""
    names = {o.needs for sw in probes.SWITCHES for o in sw.options if o.needs}
    names |= {name for name, *_ in probes.TRACEPOINTS + probes.RAW_TRACEPOINTS}
    return [Check(n, status.get(n, SUPPORTED), f"{n} detail") for n in sorted(names)]


OFFS = {"OFF_FAMILY": 16, "SZ_STACK": 16384}
CONSTS = {"rescue": OFFS, "overflow": {"REASON_LISTEN_OVERFLOW": 40}}


def test_a_machine_with_everything_gets_the_best_option_of_every_switch_and_no_notes():
    p = probes.plan("auto", machine(), CONSTS)
    assert {sw.name: p.choice(sw) for sw in probes.SWITCHES} == \
        {sw.name: sw.options[0].value for sw in probes.SWITCHES}
    assert p.notes == [] and p.consts == CONSTS
    flags = loader.cflags(p, 64)
    assert {f for sw in probes.SWITCHES for f in sw.options[0].cflags} <= set(flags)
    assert {"-DTT_OFF_FAMILY=16", "-DTT_SZ_STACK=16384", "-DTT_REASON_LISTEN_OVERFLOW=40"} \
        <= set(flags)


def test_values_from_the_kernel_go_with_the_option_that_needs_them():
    """An option not taken brings none of its values: a -D without its switch would be
    harmless, but the plan would claim what it does not use."""
    p = probes.plan("auto", machine(**{"listen overflow drops": UNSUPPORTED}), CONSTS)
    assert "overflow" not in p.consts and p.consts["rescue"] == OFFS
    assert not [f for f in loader.cflags(p, 64) if "LISTEN_OVERFLOW" in f]


@pytest.mark.parametrize("sw", probes.SWITCHES, ids=[sw.name for sw in probes.SWITCHES])
def test_each_option_is_taken_when_the_better_ones_fail_and_the_note_says_why(sw):
    failed = {}
    for i, o in enumerate(sw.options):
        p = probes.plan("auto", machine(**failed), CONSTS)
        assert p.choice(sw) == o.value
        best = sw.options[0].needs
        said = o.note.format(name=best, status=UNSUPPORTED, detail=f"{best} detail")
        assert (said in p.notes) == (i > 0 and bool(o.note)), p.notes
        on = {f[2:] for f in loader.cflags(p, 64)}
        assert {f[2:] for f in o.cflags} <= on
        assert not {f[2:] for other in sw.options if other is not o for f in other.cflags} & on
        if o.needs:
            failed[o.needs] = UNSUPPORTED


def test_a_transport_asked_for_is_taken_without_asking_the_checks():
    p = probes.plan("perf", machine(), CONSTS)
    assert p.transport == "perf" and p.notes == []
    p = probes.plan("ringbuf", machine(ringbuf=UNSUPPORTED), CONSTS)
    assert p.transport == "ringbuf"


def test_the_plan_reads_only_the_checks_it_is_given():
    """Injected checks are all the planner sees: none of this machine's shows through."""
    cs = [dataclasses.replace(c, status=UNSUPPORTED) if c.name == "kprobes" else c
          for c in machine()]
    assert probes.plan("auto", cs, CONSTS).connect_hook == "syscall"


def test_the_typed_check_looks_up_every_hook_the_loader_attaches():
    """probes.RAW_HOOKS (whose BTF ids the typed tracepoints check reads) and loader.HOOKS
    (what the loader attaches) name the same tracepoints."""
    assert set(probes.RAW_HOOKS) == {raw for _h, raw, _tp, _k, _p in loader.HOOKS}
