"""The paper's five findings (docs/protocol.md#findings), each tested on whatever cells a study has:
pure functions over the report's data model that give counts, a margin in points and the cells that break it."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from statistics import mean
from typing import Any

from pretextlab.report.data import OUTPUT_ORDER, TASK_TITLES, StudyData
from pretextlab.report.document import Block, Cell

HOLDS = "holds"
PARTLY = "holds in part"
FAILS = "does not hold"
NOT_TESTABLE = "not testable"

# The paper's contrast in its second finding is residual/reversible networks against VGG (Sec. 4.2,
# Fig. 2 of the paper): these names are the two sides; a network in neither is left out of it.
SKIP_NETWORKS = ("resnet50v1", "resnet50v2", "resnet50v2(-)", "revnet50", "revnet50(-)")
PLAIN_NETWORKS = ("vgg19bn",)
FINAL_OUTPUT = "pre_logits"
MLP_PROBE = "mlp"


@dataclass(frozen=True)
class CellRef:
    """One cell a finding cites, linked to its run."""

    config_hash: str
    text: str


@dataclass(frozen=True)
class Finding:
    key: str  # ranking, skip_connections, wider, linear_vs_mlp, pretext_predictor
    claim: str  # the paper's claim, in words
    verdict: str  # HOLDS, PARTLY, FAILS or NOT_TESTABLE
    holds: int  # comparisons that agree with the claim ...
    tested: int  # ... out of this many
    margin_points: float | None  # the finding's margin in accuracy points (see each function)
    detail: str  # the sentence: counts and margin, or which cells are missing
    breaking: tuple[CellRef, ...] = ()  # the cells that break it


def _verdict(holds: int, tested: int) -> str:
    if tested == 0:
        return NOT_TESTABLE
    return HOLDS if holds == tested else FAILS if holds == 0 else PARTLY


def _value(data: StudyData, run: dict[str, Any] | None, dataset: str, output: str, probe: str) -> float | None:
    if run is None:
        return None
    row = data.result(run["config_hash"], dataset, output, probe)
    return None if row is None or row["test_top1_percent"] is None else float(row["test_top1_percent"])


def _title(task: str) -> str:
    return TASK_TITLES.get(task, task)


def _ref(data: StudyData, config_hash: str, what: str) -> CellRef:
    return CellRef(config_hash, f"{data.run_label(config_hash)}: {what}")


def _main_cells(data: StudyData, dataset: str, output: str, probe: str) -> dict[str, dict[str, tuple[float, str]]]:
    """task -> network -> (accuracy, run) at each network's largest width: the main table's cells."""
    cells: dict[str, dict[str, tuple[float, str]]] = {}
    for network in data.networks:
        width = data.largest_width(network)
        for task in data.tasks:
            run = data.find_run(task, network, width)
            value = _value(data, run, dataset, output, probe)
            if run is not None and value is not None:
                cells.setdefault(task, {})[network] = (value, run["config_hash"])
    return cells


def finding_ranking(data: StudyData, dataset: str, output: str, probe: str) -> Finding:
    """(a) The ranking of architectures changes from task to task: for each pair of tasks, whether some
    pair of networks (main-table cells) swaps order. Margin: the smaller of a swapped pair's two gaps,
    averaged over the swaps."""
    claim = "the ranking of architectures changes from task to task"
    cells = _main_cells(data, dataset, output, probe)
    tested = holds = swaps = network_pairs = 0
    margins: list[float] = []
    breaking: list[CellRef] = []
    for first, second in combinations([t for t in data.tasks if t in cells], 2):
        common = [n for n in data.networks if n in cells[first] and n in cells[second]]
        if len(common) < 2:
            continue
        tested += 1
        pair_swaps = 0
        for a, b in combinations(common, 2):
            network_pairs += 1
            gap_first = cells[first][a][0] - cells[first][b][0]
            gap_second = cells[second][a][0] - cells[second][b][0]
            if gap_first * gap_second < 0:
                pair_swaps += 1
                margins.append(min(abs(gap_first), abs(gap_second)))
        swaps += pair_swaps
        if pair_swaps:
            holds += 1
        else:
            breaking += [_ref(data, cells[t][n][1], f"{cells[t][n][0]:.1f}") for t in (first, second) for n in common]
    if tested == 0:
        return Finding("ranking", claim, NOT_TESTABLE, 0, 0, None,
                       f"needs two tasks with {probe} results at {output} for the same two networks at their largest width "
                       f"(tasks with results: {', '.join(_title(t) for t in cells) or 'none'})")
    margin = mean(margins) if margins else None
    detail = f"the order of the networks changes in {holds} of {tested} task pair(s) ({swaps} of {network_pairs} network pairs swap)"
    if margin is not None:
        detail += f", by {margin:.1f} points on average (the smaller of the two gaps)"
    return Finding("ranking", claim, _verdict(holds, tested), holds, tested, margin, detail, tuple(breaking))


def _drops(data: StudyData, dataset: str, probe: str, task: str, networks: tuple[str, ...]) -> dict[str, tuple[float, str, str]]:
    """network -> (best earlier output minus pre_logits, its name, run) at the network's largest width."""
    drops = {}
    for network in networks:
        run = data.find_run(task, network, data.largest_width(network)) if network in data.networks else None
        final = _value(data, run, dataset, FINAL_OUTPUT, probe)
        if run is None or final is None:
            continue
        earlier = [(v, o) for o in OUTPUT_ORDER if o != FINAL_OUTPUT
                   for v in [_value(data, run, dataset, o, probe)] if v is not None]
        if earlier:
            best, name = max(earlier)
            drops[network] = (best - final, name, run["config_hash"])
    return drops


def finding_skip_connections(data: StudyData, dataset: str, probe: str) -> Finding:
    """(b) With skip connections quality does not fall off toward pre-logits, unlike VGG: per task, each
    skip-connection network's fall (best earlier output minus pre_logits) against VGG's. Margin: VGG's
    fall minus the network's, averaged."""
    claim = "with skip connections quality does not fall off toward pre-logits, unlike VGG"
    tested = holds = 0
    margins: list[float] = []
    skip_falls: list[float] = []
    plain_falls: list[float] = []
    breaking: list[CellRef] = []
    seen = {"skip": False, "plain": False}
    for task in data.tasks:
        skip = _drops(data, dataset, probe, task, SKIP_NETWORKS)
        plain = _drops(data, dataset, probe, task, PLAIN_NETWORKS)
        seen["skip"] |= bool(skip)
        seen["plain"] |= bool(plain)
        if not skip or not plain:
            continue
        plain_fall = max(d for d, _, _ in plain.values())
        plain_falls.append(plain_fall)
        for network, (fall, name, config_hash) in skip.items():
            tested += 1
            skip_falls.append(fall)
            margins.append(plain_fall - fall)
            if fall < plain_fall:
                holds += 1
            else:
                breaking.append(_ref(data, config_hash, f"{name} is {fall:.1f} above {FINAL_OUTPUT} (VGG: {plain_fall:.1f})"))
    if tested == 0:
        missing = [what for what, there in (("a network with skip connections", seen["skip"]), ("VGG19-BN", seen["plain"])) if not there]
        reason = " and ".join(missing) if missing else "both in the same task"
        return Finding("skip_connections", claim, NOT_TESTABLE, 0, 0, None,
                       f"needs {probe} results at {FINAL_OUTPUT} and an earlier output of VGG19-BN and of a network with skip "
                       f"connections for one task (missing: {reason})")
    margin = mean(margins)
    detail = (f"{FINAL_OUTPUT} falls less below the best earlier output than VGG's in {holds} of {tested} task x network pair(s), "
              f"by {margin:+.1f} points on average (best earlier output minus {FINAL_OUTPUT}: {mean(skip_falls):+.1f} with skip "
              f"connections, {mean(plain_falls):+.1f} with VGG)")
    return Finding("skip_connections", claim, _verdict(holds, tested), holds, tested, margin, detail, tuple(breaking))


def _monotone(points: list[tuple[int, float, str]]) -> bool:
    return all(b[1] > a[1] for a, b in zip(points, points[1:]))


def finding_wider(data: StudyData, dataset: str, output: str, probe: str) -> Finding:
    """(c) Wider networks and larger representations are better: each task x network's accuracy must rise
    with every step up in k (runs without a representation-size layer), and each task x network x k's
    with every step up in representation size. Margin: widest (largest) minus narrowest (smallest),
    averaged over both kinds of comparison."""
    claim = "wider networks and larger representations are better"
    by_width: dict[tuple[str, str], list[tuple[int, float, str]]] = {}
    by_size: dict[tuple[str, str, int], list[tuple[int, float, str]]] = {}
    for run in data.runs.values():
        value = _value(data, run, dataset, output, probe)
        if value is None:
            continue
        if run["representation_size"] is None:
            by_width.setdefault((run["task"], run["network"]), []).append((run["width"], value, run["config_hash"]))
        else:
            by_size.setdefault((run["task"], run["network"], run["width"]), []).append(
                (run["representation_size"], value, run["config_hash"]))
    parts: list[str] = []
    holds = tested = 0
    gains: list[float] = []
    breaking: list[CellRef] = []
    kinds = ((by_width, "wider is better", "k", "task x network pairs", "no task x network has two widths finished"),
             (by_size, "larger representations are better", "d", "task x network x k triples",
              "no task x network x k has two representation sizes finished"))
    for groups, name, unit, what, missing in kinds:
        kind_holds = kind_tested = 0
        kind_gains: list[float] = []
        for points in groups.values():
            points = sorted(points)
            if len(points) < 2:
                continue
            kind_tested += 1
            kind_gains.append(points[-1][1] - points[0][1])
            if _monotone(points):
                kind_holds += 1
            else:
                breaking += [_ref(data, h, f"{v:.1f}") for _, v, h in points]
        if kind_tested:
            parts.append(f"{name} in {kind_holds} of {kind_tested} {what}, by {mean(kind_gains):+.1f} points on average "
                         f"(largest minus smallest {unit})")
        else:
            parts.append(f"{name}: not testable ({missing})")
        holds += kind_holds
        tested += kind_tested
        gains += kind_gains
    margin = mean(gains) if gains else None
    return Finding("wider", claim, _verdict(holds, tested), holds, tested, margin, "; ".join(parts), tuple(breaking))


def finding_linear_vs_mlp(data: StudyData, dataset: str, output: str, probe: str) -> Finding:
    """(d) A linear probe ranks methods as an MLP does: over every pair of runs with both probes at
    ``output``, whether the two order them alike (Kendall's tau-a over the pairs). Margin: how far apart
    the disagreeing pairs are under the linear probe, averaged (small: they are near-ties)."""
    claim = "a linear probe ranks methods as an MLP does"
    both = []
    for config_hash, run in data.runs.items():
        linear = _value(data, run, dataset, output, probe)
        mlp = _value(data, run, dataset, output, MLP_PROBE)
        if linear is not None and mlp is not None:
            both.append((config_hash, linear, mlp))
    if len(both) < 2:
        return Finding("linear_vs_mlp", claim, NOT_TESTABLE, 0, 0, None,
                       f"needs two runs with both {probe} and {MLP_PROBE} results at {output} (finished: {len(both)})")
    tested = agree = disagree = 0
    gaps: list[float] = []
    off: dict[str, CellRef] = {}
    for (h1, l1, m1), (h2, l2, m2) in combinations(both, 2):
        tested += 1
        if (l1 - l2) * (m1 - m2) > 0:
            agree += 1
            continue
        disagree += (l1 - l2) * (m1 - m2) < 0
        gaps.append(abs(l1 - l2))
        for h, lin, mlp in ((h1, l1, m1), (h2, l2, m2)):
            off[h] = _ref(data, h, f"linear {lin:.1f}, MLP {mlp:.1f}")
    tau = (agree - disagree) / tested
    margin = mean(gaps) if gaps else None
    detail = f"the two probes order {agree} of {tested} pairs of runs alike (Kendall's tau {tau:.2f})"
    if gaps:
        detail += f"; the pairs they order differently (or tie) are {margin:.1f} points apart on average under {probe}"
    return Finding("linear_vs_mlp", claim, _verdict(agree, tested), agree, tested, margin, detail, tuple(off.values()))


def finding_pretext_predictor(data: StudyData, dataset: str, output: str, probe: str) -> Finding:
    """(e) Pretext accuracy is a weak predictor of downstream accuracy: per task (pretext accuracies of
    different tasks are not comparable), whether some pair of runs has the higher pretext accuracy with
    the lower downstream accuracy. Margin: the downstream gap of such pairs, averaged."""
    claim = "pretext accuracy is a weak predictor of downstream accuracy"
    tested = holds = reversed_pairs = pairs = 0
    gaps: list[float] = []
    worst: tuple[float, str] | None = None
    breaking: list[CellRef] = []
    for task in data.tasks:
        runs = []
        for config_hash, run in data.runs.items():
            value = _value(data, run, dataset, output, probe)
            if run["task"] == task and value is not None and run.get("pretext_val_accuracy_percent") is not None:
                runs.append((config_hash, float(run["pretext_val_accuracy_percent"]), value))
        if len(runs) < 2:
            continue
        tested += 1
        task_reversed = 0
        for (h1, p1, d1), (h2, p2, d2) in combinations(runs, 2):
            pairs += 1
            if (p1 - p2) * (d1 - d2) < 0:
                task_reversed += 1
                gaps.append(abs(d1 - d2))
                (hp, pp, dp), (hl, pl, dl) = ((h1, p1, d1), (h2, p2, d2)) if p1 > p2 else ((h2, p2, d2), (h1, p1, d1))
                example = (f"{data.run_label(hp)} (pretext {pp:.1f}, downstream {dp:.1f}) against "
                           f"{data.run_label(hl)} (pretext {pl:.1f}, downstream {dl:.1f})")
                if worst is None or abs(d1 - d2) > worst[0]:
                    worst = (abs(d1 - d2), example)
        reversed_pairs += task_reversed
        if task_reversed:
            holds += 1
        else:
            breaking += [_ref(data, h, f"pretext {p:.1f}, downstream {d:.1f}") for h, p, d in runs]
    if tested == 0:
        return Finding("pretext_predictor", claim, NOT_TESTABLE, 0, 0, None,
                       f"needs two runs of one task with a pretext validation accuracy and a {probe} result at {output}")
    margin = mean(gaps) if gaps else None
    detail = (f"higher pretext accuracy came with lower downstream accuracy in {reversed_pairs} of {pairs} pairs of runs "
              f"of the same task, in {holds} of {tested} task(s)")
    if worst is not None:
        detail += f", by {margin:.1f} points on average; the widest: {worst[1]}"
    return Finding("pretext_predictor", claim, _verdict(holds, tested), holds, tested, margin, detail, tuple(breaking))


def findings(data: StudyData, dataset: str, output: str = FINAL_OUTPUT, probe: str = "lbfgs") -> list[Finding]:
    """The five findings, in the paper's order, on ``dataset`` (``probe`` at ``output`` unless a finding
    says otherwise: the second compares outputs, the fourth adds the MLP probe)."""
    return [
        finding_ranking(data, dataset, output, probe),
        finding_skip_connections(data, dataset, probe),
        finding_wider(data, dataset, output, probe),
        finding_linear_vs_mlp(data, dataset, output, probe),
        finding_pretext_predictor(data, dataset, output, probe),
    ]


def findings_list(found: list[Finding], max_refs: int = 8) -> Block:
    """The findings as a list block: claim (bold), verdict, the sentence, and the cells that break it
    linked to their runs (the first ``max_refs``, then how many more)."""
    items = []
    for finding in found:
        item = [Cell(finding.claim[0].upper() + finding.claim[1:], bold=True), Cell(f": {finding.verdict}")]
        item.append(Cell(f" — {finding.detail}."))
        if finding.breaking:
            item.append(Cell(" Cells that break it: "))
            for index, ref in enumerate(finding.breaking[:max_refs]):
                item += [Cell("; " if index else ""), Cell(ref.text, link=ref.config_hash)]
            if len(finding.breaking) > max_refs:
                item.append(Cell(f"; and {len(finding.breaking) - max_refs} more"))
            item.append(Cell("."))
        items.append([c for c in item if c.text])
    return Block("list", items=items)
