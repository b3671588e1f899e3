"""What a study's cells have done: registering them in the store, and each one's state (done / running /
left) as the store and its run directory show it."""

from __future__ import annotations

from dataclasses import dataclass

from pretextlab.study.grid import Cell
from pretextlab.study.model import Study
from pretextlab.study.store import ResultsStore


@dataclass
class CellStatus:
    cell: Cell
    state: str  # done / running / left
    status: str  # the store's status
    probes_done: int
    has_checkpoint: bool
    owner: str | None


def register(study: Study, store: ResultsStore, cells: list[Cell]) -> None:
    """Write the study and its cells (pending) into the store; existing rows keep their results."""
    store.set_meta("study_name", study.name)
    store.set_meta("study_text", study.text)
    store.set_meta("study_file", str(study.path) if study.path else "")
    store.set_meta("network_order", ",".join(dict.fromkeys(n for g in study.grids for n in g.networks)))
    store.set_meta("task_order", ",".join(dict.fromkeys(t for g in study.grids for t in g.tasks)))
    store.set_meta("dataset_order", ",".join(study.downstream))
    for cell in cells:
        store.register_run(
            cell.config_hash,
            task=cell.task,
            network=cell.network,
            width=cell.width,
            representation_size=cell.representation_size,
            config=cell.config.to_dict(),
            run_dir=str(cell.run_dir),
            plan=[job.planned for job in cell.plan],
        )
    store.retire(cell.config_hash for cell in cells)


def study_status(study: Study, store: ResultsStore | None, cells: list[Cell]) -> list[CellStatus]:
    """Each cell's state as the store has it; a cell the store does not hold yet (or no store at
    all, for a dry run of a new study) is pending, and a finished cell with newly planned probes is left."""
    runs = {r["config_hash"]: r for r in store.runs()} if store is not None else {}
    statuses = []
    for cell in cells:
        run = runs.get(cell.config_hash)
        stored = store.probe_recipes(cell.config_hash) if store is not None and run is not None else {}
        probes_done = sum(1 for job in cell.plan if job.done_in(stored))
        if run is None:
            state, status, owner = "left", "pending", None
        else:
            state, status, owner = store.cell_state(run, study.runtime.stale_seconds), run["status"], run["owner"]  # type: ignore[union-attr]
            if state == "done" and probes_done < len(cell.plan):
                state, status = "left", "pending"  # what register() will make of it
        statuses.append(
            CellStatus(
                cell=cell,
                state=state,
                status=status,
                probes_done=probes_done,
                has_checkpoint=(cell.run_dir / "checkpoint.pt").exists(),
                owner=owner,
            )
        )
    return statuses


def format_status(statuses: list[CellStatus]) -> str:
    lines = [f"{'cell':<40} {'hash':<12} {'state':<8} {'probes':>7}  detail"]
    for s in statuses:
        if s.state == "done":
            detail = "finished"
        elif s.state == "running":
            detail = f"held by {s.owner}"
        else:
            detail = {"failed": "failed earlier: will retry", "interrupted": "interrupted: will resume"}.get(s.status, "")
            if s.status == "running":
                detail = "its worker died or went silent: will resume"
            if s.has_checkpoint and not detail:
                detail = "has a checkpoint: will resume"
        lines.append(f"{s.cell.label:<40} {s.cell.config_hash:<12} {s.state:<8} {s.probes_done:>3}/{len(s.cell.plan):<3}  {detail}")
    counts = {state: sum(1 for s in statuses if s.state == state) for state in ("done", "running", "left")}
    lines.append(f"{len(statuses)} cells: {counts['done']} done, {counts['running']} running, {counts['left']} left")
    return "\n".join(lines)
