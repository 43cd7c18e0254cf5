"""`cellvec evaluate`: cross-validation against baselines."""

from __future__ import annotations

import click

from cellvec._files import check_folder, replacing
from cellvec.cell_index.recipe import MAX_K
from cellvec.cli.options import (
    emit_json,
    input_options,
    json_option,
    model_option,
    recipe_options,
    store_option,
)


@click.command("evaluate")
@click.argument("data", type=click.Path(exists=True))
@click.option("--label-key", required=True, help="obs column with the cell labels.")
@click.option(
    "--broad-label-key",
    help="obs column with coarser labels (e.g. cell_type_broad): score both levels, and how "
    "many cells whose fine label is unassigned still get the right broad one.",
)
@store_option
@model_option(multiple=True)
@recipe_options
@click.option(
    "--folds",
    default=5,
    show_default=True,
    type=click.IntRange(min=0),
    help="Stratified folds; 0 scores only --query (the whole of DATA is the reference).",
)
@click.option(
    "-k",
    default=15,
    show_default=True,
    type=click.IntRange(1, MAX_K),
    help="Neighbours in the vote.",
)
@click.option(
    "--baselines",
    is_flag=True,
    help="Also score pca_knn, logreg_expr, logreg_balanced (classes weighted by size), "
    "naive_mean, graph_baseline, random_vectors, cellvec_unrefined.",
)
@click.option(
    "--peers",
    help="Real peers in the same folds: celltypist (runs in its own virtual environment, "
    "made on first use).",
)
@click.option(
    "--representations",
    help="Score exactly these, e.g. logreg_expr,celltypist,cellvec (default: cellvec plus "
    "what --baselines, --peers and --ablations add; 'none': the scenarios only).",
)
@click.option("--ablations", is_flag=True, help="Also score head_only, no_center, top200.")
@click.option("--data-limited", help="Learning curve: reference cells per class, e.g. 5,10,20,50.")
@click.option("--panel", help="Query keeps a random share of its genes, e.g. 0.3,0.1.")
@click.option(
    "--leave-out", multiple=True, help="Leave this subtype out of the reference (repeatable)."
)
@click.option(
    "--min-typicality",
    default=0.01,
    show_default=True,
    help="Unassigned threshold scored with --leave-out and --broad-label-key.",
)
@click.option(
    "--min-mixing",
    default=0.01,
    show_default=True,
    help="Mixing-test threshold scored with --leave-out (see `cellvec map --min-mixing`).",
)
@click.option(
    "--min-confidence",
    default=0.0,
    show_default=True,
    help="Vote-confidence threshold scored with --leave-out and --broad-label-key.",
)
@click.option(
    "--species-swap",
    type=click.Choice(["mouse", "human"]),
    help="Rename each fold's query (and --query) to this species' symbols through the "
    "one-to-one orthologs of --orthologs, and map it onto the unchanged reference.",
)
@click.option(
    "--orthologs",
    type=click.Path(exists=True, dir_okay=False),
    help="Ortholog table for --species-swap (e.g. hcop_mouse_to_human.csv.gz).",
)
@click.option(
    "--query",
    type=click.Path(exists=True),
    help="Second labelled dataset: transfer score, no retraining.",
)
@click.option("--query-label-key", help="Label column of --query (default: --label-key).")
@click.option(
    "--label-map",
    type=click.Path(exists=True, dir_okay=False),
    help="Query label -> reference label map.",
)
@click.option(
    "--markdown", type=click.Path(dir_okay=False), help="Also write a markdown results table here."
)
@click.option(
    "--prior",
    help="cellvec's atlases start from this pre-trained prior of the store (`cellvec prior "
    "build`); build it from other datasets than DATA.",
)
@click.option("--seed", default=0, show_default=True)
@input_options
@json_option
def evaluate_cmd(
    data,
    label_key,
    broad_label_key,
    store,
    model,
    recipe,
    folds,
    k,
    baselines,
    peers,
    representations,
    ablations,
    data_limited,
    panel,
    leave_out,
    min_typicality,
    min_mixing,
    min_confidence,
    species_swap,
    orthologs,
    query,
    query_label_key,
    label_map,
    markdown,
    prior,
    seed,
    read_options,
    as_json,
):
    """Stratified k-fold evaluation of the recipe (and baselines) on labelled DATA.

    \b
    Example:
      cellvec evaluate pbmc3k.h5ad --label-key classified --store store/ \\
          --baselines --peers celltypist --panel 0.3,0.1 --leave-out NK --json
      cellvec evaluate pbmc_3chem.h5ad --label-key cell_type --store store/ \\
          --broad-label-key cell_type_broad --min-confidence 0.6 --baselines
      cellvec evaluate pbmc_3chem.h5ad --label-key cell_type --store store/ \\
          --species-swap mouse --orthologs hcop_mouse_to_human.csv.gz --peers celltypist
    """
    from cellvec.cell_index.readers import read_expression
    from cellvec.evaluation.evaluate import evaluate
    from cellvec.evaluation.plan import EvaluationPlan, Scenarios, UnassignedCall

    if folds == 1:
        raise click.BadParameter(
            "one fold leaves no cells to train on: give 2 or more, or 0 to score only --query.",
            param_hint="--folds",
        )
    if folds == 0 and query is None:
        raise click.BadParameter(
            "0 folds scores only --query, and none was given: add --query FILE, or give 2 or "
            "more folds.",
            param_hint="--folds",
        )

    if markdown:
        check_folder(markdown)  # before the folds: a mistyped folder costs no fitting

    def read(path):
        return read_expression(path, **read_options)

    res = evaluate(
        read(data),
        label_key=label_key,
        broad_label_key=broad_label_key,
        store=store,
        models=list(model),
        recipe=recipe,
        plan=EvaluationPlan(
            folds=folds or EvaluationPlan.folds,
            skip_folds=folds == 0,
            k=k,
            seed=seed,
            representations=_representations(representations),
            baselines=baselines,
            peers=_listed(peers),
            ablations=ablations,
            prior=prior,
        ),
        scenarios=Scenarios(
            data_limited=_listed(data_limited, int),
            panels=_listed(panel, float),
            leave_out=tuple(leave_out),
            call=UnassignedCall(
                min_typicality=min_typicality, min_mixing=min_mixing, min_confidence=min_confidence
            ),
            species_swap=species_swap,
            orthologs=orthologs,
            transfer=_transfer(read(query) if query else None, query_label_key, label_map),
        ),
    )
    _show(res, markdown, as_json)


def _listed(text: str | None, kind=str) -> tuple:
    """`--peers celltypist`, `--panel 0.3,0.1`: comma-separated values."""
    return tuple(kind(x.strip()) for x in text.split(",")) if text else ()


def _representations(text: str | None) -> tuple[str, ...] | None:
    """`--representations`: None when not given (the default set), () for 'none'."""
    if text is None:
        return None
    return () if text == "none" else tuple(text.split(","))


def _transfer(query, query_label_key: str | None, label_map: str | None):
    """The `--query` transfer scenario, None without a query."""
    from cellvec.cell_index.mapping import read_label_map
    from cellvec.evaluation.plan import Transfer

    if query is None:
        return None
    return Transfer(query, query_label_key, read_label_map(label_map) if label_map else None)


def _show(res, markdown: str | None, as_json: bool) -> None:
    """Print the JSON or the per-class tables and markdown, then write `--markdown` (whole
    or not at all)."""
    from cellvec.metrics import metrics_table

    if as_json:
        emit_json(res.to_dict())
    else:
        for name, m in res.representations.items():
            click.echo(f"== {name}")
            click.echo(metrics_table(m))
        click.echo("")
        click.echo(res.to_markdown())
    if markdown:
        with replacing(markdown) as tmp:
            tmp.write_text(res.to_markdown() + "\n")
