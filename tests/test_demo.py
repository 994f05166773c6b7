"""`make demo`'s metrics step prints the figures it announces, not just a heading."""

from __future__ import annotations

from proxy.demo import FIGURES, figure_lines

PAGE = """\
# HELP baton_commands_total Commands relayed, by command
# TYPE baton_commands_total counter
baton_commands_total{command="query"} 15199.0
baton_commands_total{command="ping"} 0.0
baton_command_seconds_count 15199.0
baton_reparents_total{kind="prs",outcome="succeeded"} 2.0
baton_buffer_held_total 8.0
baton_buffer_flushed_total 8.0
baton_buffer_evicted_total{reason="buffer_full"} 0.0
baton_buffer_evicted_total{reason="shutdown"} 0.0
baton_sessions_moved_total{outcome="moved"} 8.0
"""


def test_every_figure_is_shown_once_with_its_value_and_zeros_are_summed_up() -> None:
    shown = figure_lines(PAGE)
    assert shown == [
        'baton_commands_total{command="query"} 15199.0',
        'baton_reparents_total{kind="prs",outcome="succeeded"} 2.0',
        "baton_buffer_held_total 8.0",
        "baton_buffer_flushed_total 8.0",
        "baton_buffer_evicted_total 0",
        'baton_sessions_moved_total{outcome="moved"} 8.0',
        "baton_errors_total 0",
    ]
    assert [line.split("{")[0].split(" ")[0] for line in shown] == list(FIGURES)
