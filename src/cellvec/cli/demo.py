"""`cellvec demo`: the whole pipeline on shipped data."""

from __future__ import annotations

import click

from cellvec.cell_index.recipe import REFINES, Recipe


@click.command("demo")
@click.option("--out", default="demo_output", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False),
    help="Folder with the demo data (default: shipped).",
)
@click.option("--refine", type=click.Choice(REFINES), default=Recipe.refine, show_default=True)
def demo_cmd(out, data, refine):
    """The whole pipeline on shipped data, offline: gene store, atlas, refinement, mapping, report.

    \b
    Example:
      cellvec demo --out demo_output/
    """
    from cellvec.demo import run_demo

    summary = run_demo(out, data_dir=data, refine=refine)
    click.echo("")
    click.echo(
        "cellvec demo: PBMC 68k (reduced), 10 cell types; reference 70% / query 30% of the cells"
    )
    click.echo(f"  accuracy            {summary['accuracy']:.3f}")
    click.echo(f"  macro-F1            {summary['macro_f1']:.3f}")
    click.echo(f"  balanced accuracy   {summary['balanced_accuracy']:.3f}")
    click.echo(
        f"  unassigned          {summary['unassigned_fraction']:.1%} (confidence < {summary['min_confidence']})"
    )
    click.echo(f"  time                {summary['seconds']:.0f} s")
    click.echo(f"  report              {summary['report']}")
