"""The triage report: every active probe's findings over a window, reasoned across probes,
ranked, and rendered.

- report.py: build_report() (the report as a dict), EXIT_CODES (node_name() is daemon/host/node.py's);
- rules.py (+ frag_rules.py): the cross-probe rules, one function per correlation, in RULES'
  order, over board.py (the findings under reasoning, folding, the score) and evidence.py
  (typed views of the probes' evidence the rules read);
- series.py: the window's rates for the charts, from the series the probes declare;
- text.py and html.py: the report rendered as text and as one self-contained HTML page.
"""

from dpwatch.daemon.triage.board import score
from dpwatch.daemon.triage.frag_rules import ICMP_CAVEAT
from dpwatch.daemon.host.node import node_name
from dpwatch.daemon.triage.report import EXIT_CODES, build_report
from dpwatch.daemon.triage.rules import RULES, TRIAGE_FINDING_IDS, correlate
from dpwatch.daemon.triage.series import build_series
from dpwatch.daemon.triage.text import SHELL_COMMANDS, render_text

__all__ = ["EXIT_CODES", "ICMP_CAVEAT", "RULES", "SHELL_COMMANDS", "TRIAGE_FINDING_IDS", "build_report",
           "build_series", "correlate", "node_name", "render_text", "score"]
