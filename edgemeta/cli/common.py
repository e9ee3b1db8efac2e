"""Options and output shared by the board's commands (cli/board.py) and `edgemeta remote` (cli/remote.py)."""

from __future__ import annotations

import json

import click

from edgemeta.errors import EdgemetaError

# --- shared by the board's commands and `edgemeta remote` ---------------------------------------


def adapt_setting(steps: str, lr: str | None) -> tuple[int, float | None]:
    """--steps/--adapt and --lr, parsed here (not by click) so that bad values get the one-line error."""
    from edgemeta.runtime.store import MAX_ADAPT_STEPS, check_adapt

    try:
        n = int(steps)
    except ValueError:
        raise EdgemetaError(f"adaptation steps must be an integer from 0 (off) to {MAX_ADAPT_STEPS}, got {steps!r}") from None
    try:
        rate = None if lr is None else float(lr)
    except ValueError:
        raise EdgemetaError(f"the adaptation learning rate must be a finite positive number, got {lr!r}") from None
    return check_adapt(n, rate)


def enroll_options(f):
    """The options `enroll` and `remote enroll` share (what the samples are, how they are kept)."""
    for option in reversed((
        click.option("--label", default=None, help="The class these samples show."),
        click.option("--from-folders", "root", default=None, type=click.Path(file_okay=False),
                     help="Enroll every sub-folder of this folder as a class named after it (instead of --label)."),
        click.option("--negative", is_flag=True,
                     help='Samples of "none of these" (instead of --label): never a class, they teach `calibrate` strangers.'),
        click.option("--keep-samples/--no-keep-samples", default=True, show_default=True,
                     help="A new store keeps each sample too, so that a model upgrade re-embeds it (`reenroll`, deploy); "
                          "without, an upgrade means enrolling again."),
        click.option("--allow-duplicates", is_flag=True, help="Enroll a sample even when the same image is already enrolled."),
        click.option("--adapt", "adapt_steps", default=None, metavar="STEPS",
                     help="Also set the store's head adaptation (as `edgemeta adapt --steps`)."),
        click.option("--lr", default=None, metavar="RATE", help="With --adapt: its learning rate (as `edgemeta adapt --lr`)."),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    )):
        f = option(f)
    return f


def check_enroll_options(label, root, negative: bool, files, adapt_steps, lr) -> tuple[int, float | None] | None:
    """The checks `enroll` and `remote enroll` share; returns the --adapt setting."""
    if sum((label is not None, root is not None, negative)) != 1:
        raise EdgemetaError("say what the samples are: --label NAME, --from-folders ROOT or --negative (one of them)")
    if root is not None and files:
        raise EdgemetaError("--from-folders takes its classes from ROOT's sub-folders; give no FILES with it")
    if root is None and not files:
        raise EdgemetaError("give the samples: image files, .npy arrays or a folder of them")
    if lr is not None and adapt_steps is None:
        raise EdgemetaError("--lr goes with --adapt STEPS")
    if negative and adapt_steps is not None:
        raise EdgemetaError("--adapt goes with classes, not with --negative samples")
    return adapt_setting(adapt_steps, lr) if adapt_steps is not None else None


def print_enrolled(done: list[dict], as_json: bool, several: bool) -> None:
    """What enroll says, on the board and through `remote`: per class {label, samples, added, duplicates}."""
    if as_json:
        click.echo(json.dumps(done if several else done[0]))
        return
    for d in done:
        dups = d["duplicates"]
        skipped = f"; skipped {len(dups)} duplicate(s): {', '.join(dups[:3])}" if dups else ""
        more = " ..." if len(dups) > 3 else ""
        click.echo(f"enrolled {d['added']} sample(s) as {d['label']!r}; it now has {d['samples']} sample(s){skipped}{more}")


def print_negatives(added: int, total: int, as_json: bool) -> None:
    click.echo(json.dumps({"negatives": total}) if as_json else
               f"added {added} negative sample(s); the store has {total}; `edgemeta calibrate` uses them")


def _rate(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise EdgemetaError(f"{option} is a share between 0 and 1 (0.95 for 95%), got {text!r}")
    return value


def open_set_setting(accept: str | None, false_accept: str | None, threshold: str | None, show: bool) -> dict:
    """`calibrate`'s options as one setting {mode, accept, false_accept, threshold} (mode "show": only look)."""
    if sum(x is not None for x in (accept, false_accept, threshold)) + show > 1:
        raise EdgemetaError("give one of --accept, --false-accept, --threshold or --show")
    if show:
        return {"mode": "show"}
    if threshold is not None:
        if threshold in ("off", "model"):
            return {"mode": threshold}
        try:
            t = float(threshold)
        except ValueError:
            t = float("nan")
        if not 0 <= t < float("inf"):
            raise EdgemetaError(f"--threshold is a distance (a number >= 0), 'off' or 'model', got {threshold!r}")
        return {"mode": "manual", "threshold": t}
    if false_accept is not None:
        return {"mode": "calibrated", "false_accept": _rate(false_accept, "--false-accept")}
    return {"mode": "calibrated", "accept": _rate(accept or "0.95", "--accept")}


def print_open_set(info: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(describe_open_set(info))
    if info.get("warning"):
        click.echo(f"warning: {info['warning']}", err=True)


def describe_open_set(info: dict) -> str:
    t = info["threshold"]
    test = "never answers 'unknown'" if t is None else f"answers 'unknown' when the nearest class is farther than {t:.4g}"
    how = {"off": "turned off", "manual": "set by hand", "model": "the model's threshold, from its validation classes",
           "calibrated": f"calibrated on this store: {info.get('rule', '')}"}[info["mode"]]
    lines = [f"{test} ({how})"]
    if info.get("note"):
        lines.append(f"  {info['note']}")
    if info["mode"] == "calibrated" and "known_samples" in info:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.1f}%"

        lines.append(f"  expected: {pct(info.get('known_accept'))} of new samples of enrolled classes accepted "
                     f"({info['known_samples']} left out), {pct(info.get('false_accept'))} of strangers accepted "
                     f"({info['strangers']}: enrolled classes left out and {info['negatives']} negative sample(s))")
    return "\n".join(lines)


def print_new_store(kept) -> None:
    click.echo(f"the store is empty now; the old one is kept as {kept}" if kept else "there was no store: it is empty")


def describe_head(h: dict) -> str:
    """What a store is classified with (the runtime's describe_head, maybe from a board) in words."""
    from edgemeta.runtime.heads import describe_text

    return describe_text(h)


def print_results(results: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        others = ", ".join(f"{t['label']} {100 * t['probability']:.1f}%" for t in r["top"])
        click.echo(f"{r['file']}: {r['label']} (distance {r['distance']:.3g}; {others})")


def print_classes(counts: dict[str, int], backbone: dict, as_json: bool, adapt: dict | None = None) -> None:
    if as_json:
        click.echo(json.dumps({"backbone": backbone, "classes": counts, "adapt": adapt}, indent=2))
        return
    click.echo(f"{len(counts)} class(es), backbone {backbone.get('model')}/{backbone.get('variant')}"
               + (f", head adapted with {adapt['steps']} step(s)" if adapt else ""))
    for name, n in counts.items():
        click.echo(f"  {name}: {n} sample(s)")


# The commands, one module per audience; importing them registers them on `main`.
