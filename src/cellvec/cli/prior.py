"""`cellvec prior`: build and list pre-trained priors, the starting point of small atlases."""

from __future__ import annotations

import click

from cellvec.cli.options import (
    emit_json,
    input_options,
    json_option,
    model_option,
    recipe_options,
    store_option,
)


@click.group()
def prior():
    """Build and list pre-trained priors (`atlas build --prior NAME` starts from one)."""


@prior.command("build")
@click.argument("references", nargs=-1, required=True, type=click.Path(exists=True))
@store_option
@click.option("--name", required=True, help="Prior name (letters, digits, underscores).")
@click.option(
    "--label-key",
    "label_keys",
    multiple=True,
    required=True,
    help="obs column with the cell labels: once for every reference, or once per reference "
    "in their order.",
)
@click.option(
    "--exclude-labels",
    metavar="L1,L2",
    help="Drop cells with these labels (e.g. Doublet,Unknown) from every reference.",
)
@model_option()
@recipe_options
@input_options
@click.option("--seed", default=0, show_default=True, help="Seed of the refinement.")
@json_option
def build(
    references,
    store,
    name,
    label_keys,
    exclude_labels,
    model,
    recipe,
    read_options,
    seed,
    as_json,
):
    """Pre-train a refinement on labelled REFERENCES (pooled, each file's labels kept apart)
    as a prior for small atlases of related cells.

    An atlas built with `--prior NAME` takes the prior's background, starts its gene gates
    and corrections from the prior's, and its head from the prior's head: with a few
    labelled cells a class it then learns what tells its subtypes apart on top of what
    the prior learned. Use references of the tissue you will map (on PBMC, a prior of
    the other PBMC sets gained 0.02-0.06 macro-F1 on average over 3 seeds at 3-20 cells a
    class on pbmc_3chem, but nothing beyond the seed spread at 5-10 on pbmc3k; one of
    pancreas cells lost up to 0.04), and leave out the cells you will build the atlas
    from. Check it on your data with `evaluate --prior`. The prior must be built with the
    --background and --center its atlases use.

    \b
    Example:
      cellvec prior build pbmc_a.h5ad pbmc_b.h5ad --store store/ --name pbmc \\
          --label-key cell_type --label-key bulk_labels
      cellvec atlas build my_few_cells.h5ad --store store/ --name mine \\
          --label-key cell_type --prior pbmc
    """
    from pathlib import Path

    from cellvec.cell_index.labels import reference_labels
    from cellvec.cell_index.prior import build_prior, check_prior_name
    from cellvec.cell_index.readers import read_expression

    check_prior_name(name)  # before the references are read
    if len(label_keys) not in (1, len(references)):
        raise click.BadParameter(
            f"{len(label_keys)} label keys for {len(references)} references: give one for all "
            "or one per reference, in their order.",
            param_hint="--label-key",
        )
    keys = label_keys * len(references) if len(label_keys) == 1 else label_keys
    refs = []
    for path, key in zip(references, keys):
        source = read_expression(path, **read_options)
        source, labels, _, _ = reference_labels(source, key, exclude_labels=exclude_labels or ())
        refs.append((_dataset_name(Path(path), [n for n, _, _ in refs]), source, labels))
    p = build_prior(
        refs,
        store=store,
        name=name,
        model=model,
        recipe=recipe,
        seed=seed,
    )
    if as_json:
        emit_json({"name": p.name, **_summary(p.meta)})
    else:
        click.echo(
            f"prior {p.name}: {p.meta['n_cells']:,} cells of {', '.join(n for n, _, _ in refs)}, "
            f"{p.meta['n_genes']:,} genes -> {store}"
        )


def _dataset_name(path, taken: list[str]) -> str:
    """A reference's name in the prior's labels: its stem (as an atlas's `dataset` column
    names its file), numbered when taken."""
    name = path.stem
    out, i = name, 2
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out


def _summary(meta: dict) -> dict:
    r = meta["recipe"]
    return {
        "n_cells": meta["n_cells"],
        "n_genes": meta["n_genes"],
        "sources": meta["sources"],
        "model": r["model"],
        "hash": r["head_hash"],
        "created": meta.get("created"),
    }


@prior.command("list")
@store_option
@json_option
def list_cmd(store, as_json):
    """List the priors of a store with what they were trained on.

    \b
    Example:
      cellvec prior list --store store/
    """
    from cellvec.cell_index.prior import describe_prior, list_priors

    out = [{"name": n, **_summary(describe_prior(store, n))} for n in list_priors(store)]
    if as_json:
        emit_json({"priors": out})
    else:
        for p in out:
            sources = ", ".join(f"{s['dataset']} ({s['n_cells']:,})" for s in p["sources"])
            click.echo(f"{p['name']:<20} {p['model']} {p['n_genes']:>7,} genes  {sources}")
