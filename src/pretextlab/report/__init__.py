"""A study's report: its tables and figures, rebuilt from its results store alone.

``build_report(store, out_dir)`` writes ``report.md`` and ``report.html`` (the same content) and
each figure as PNG and SVG (PDF with ``pdf=True``), for whatever has finished; cells and figures
without results say so. Every number links to its run (its block in the report's run list, which
gives the run's config hash, status, directory and full config; in the HTML the link opens the block).
Each run has one colour and marker in every figure (colour by network, marker by k and
representation size), each figure one legend outside its plots.

Contents, per downstream dataset:
- the main table: networks x tasks at each network's largest width (the study's Table 2); the best
  cell of each column in bold, the best of each row underlined;
- the findings: each of the paper's five findings tested on the study's cells (holds, holds in
  part, does not hold, or not testable and why), with counts, a margin and the breaking cells linked;
- accuracy by output (block1 .. pre_logits) per network and task;
- accuracy by widening factor per network and task;
- pretext accuracy against downstream accuracy, marker size = width;
- linear (L-BFGS) against MLP probes; few-label curves; the width x representation-size heat map;
  SGD probe convergence curves;
and, for the whole study, the pretext training curves.

Accuracies are percent everywhere: in the store (``*_percent`` columns), the tables and the figures.

Modules: ``data`` (what is read from the store), ``document`` (the document model), ``findings``, ``tables``,
``figures`` and ``curves`` (the figures, each with the table of its numbers), ``render`` (Markdown
and HTML from the one document model: tables aligned by type, responsive and print CSS), ``build``
(the report), ``browser`` (the page in headless Chromium: checks and screenshots).
"""

from pretextlab.report.build import Report, build_report
from pretextlab.report.tables import format_chosen

__all__ = ["Report", "build_report", "format_chosen"]
