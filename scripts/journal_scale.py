"""How a lifelong journal grows and what compaction buys: edit N facts in batches through a journal, then time the
undo of the first and the last edit, compact, and time them again.

    python scripts/journal_scale.py --model tiny-llama --edits 10000 --n-edits 10 --compact-keep 10

Prints the journal's size on disk and the wall time of each step. The editor is untrained (its edits are what
they are; the journal's cost does not depend on their quality); the facts are the bundled ones, repeated as needed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--edits", type=int, default=10000)
    parser.add_argument("--n-edits", type=int, default=10, help="facts per edit batch (journal entry)")
    parser.add_argument("--compact-keep", type=int, default=10, help="edit batches left revertible after compaction")
    parser.add_argument("--folder", help="journal folder (default: a temporary one, deleted at the end)")
    args = parser.parse_args()

    from emsedit_fast import api
    from emsedit_fast.config import load
    from emsedit_fast.data import bundled_facts

    cfg = load("emsedit", mode="sequential", overrides=[f"model.name={args.model}", "model.device=cpu",
                                                      "editor.rank=8", "editor.eta_init=1e-2"])
    pool = bundled_facts("train") + bundled_facts("valid") + bundled_facts("eval")
    facts = [pool[i % len(pool)] for i in range(args.edits)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or os.path.join(tmp, "journal")
        session = api.open_session(cfg, journal=folder)
        weights = {m.name: m.module.weight.data for m in session.modules}
        t = time.perf_counter()
        results, refused = api.edit(session, facts, n_edits=args.n_edits, measure=False, progress=False)
        journal = session.journal
        ids = journal.active_ids()
        seconds, mib = time.perf_counter() - t, journal.disk_bytes() / 2**20
        print(f"{len(results)} edit batches of {args.n_edits} ({args.edits} facts) on {args.model}: "
              f"{seconds:.1f} s, {len(refused)} refused; journal {mib:.1f} MiB")

        def timed_revert(edit_id: int, what: str) -> None:
            t0 = time.perf_counter()
            journal.revert(edit_id, weights)
            print(f"  revert {what} (edit {edit_id}, {len(journal.active_ids())} active edits left): "
                  f"{time.perf_counter() - t0:.2f} s")

        timed_revert(ids[-1], "the last edit")
        timed_revert(ids[0], "the first edit")
        keep_from = journal.active_ids()[-args.compact_keep]
        upto = max(i for i in journal.active_ids() if i < keep_from)
        t0 = time.perf_counter()
        journal.compact(upto)
        print(f"compact up to edit {upto}: {time.perf_counter() - t0:.2f} s; journal "
              f"{journal.disk_bytes() / 2**20:.1f} MiB, {len(journal.active_ids())} revertible edits")
        timed_revert(journal.active_ids()[0], "the oldest revertible edit")


if __name__ == "__main__":
    main()
