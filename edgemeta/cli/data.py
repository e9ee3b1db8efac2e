"""Data commands: generate training data that is not on the machine (`edgemeta data speech`)."""

from __future__ import annotations

import click

from edgemeta.cli.app import main, whole


@main.group()
def data() -> None:
    """Generate training data reproducibly from a seed."""


@data.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write: one sub-folder of wav files per word.")
@click.option("--words", type=whole(2, 20000), default=2000, show_default=True, help="Vocabulary size (classes).")
@click.option("--clips", type=whole(1, 1000), default=16, show_default=True, help="Clips per word.")
@click.option("--seed", type=whole(0, 2**31 - 1), default=0, show_default=True)
@click.option("--words-file", default=None, type=click.Path(dir_okay=False),
              help="Word list, one word per line (default: Debian's wamerican, /usr/share/dict/words).")
@click.option("--jobs", type=whole(1, 64), default=1, show_default=True, help="Worker processes.")
def speech(out: str, words: int, clips: int, seed: int, words_file: str | None, jobs: int) -> None:
    """Spoken words from text-to-speech (espeak-ng, flite), made less clean (speed, microphone band, room,
    noise), for meta-training keyword models. The Speech Commands test keywords and their near homophones
    are left out. Same seed, same files; a rerun finishes an interrupted one."""
    from edgemeta.host.data.speech import WORD_LIST, SpeechPlan, generate

    chosen = generate(out, SpeechPlan(words=words, clips=clips, seed=seed), words_file=words_file or WORD_LIST,
                      jobs=jobs, log=lambda m: click.echo(m, err=True))
    click.echo(f"{len(chosen)} words x {clips} clips in {out}")
