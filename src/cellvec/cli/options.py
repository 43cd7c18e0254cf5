"""Option decorators shared by commands."""

from __future__ import annotations

import functools
import json
import sys

import click

from cellvec.cell_index.recipe import BACKGROUNDS, REFINES, SKIP_GENES, WEIGHTINGS, Recipe

STORE_HELP = (
    "The store (LanceDB): a directory, or an object-store URI (s3://BUCKET/PREFIX, "
    "gs://BUCKET/PREFIX, az://CONTAINER/PREFIX)."
)


def store_options(*, required: bool = True, help: str = STORE_HELP):
    """`--store PATH_OR_URI` and repeatable `--storage-option KEY=VALUE`; the command gets
    `store` as a `cellvec.storage.StoreLocation` (None when not given)."""

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, store=None, storage_option=(), **kwargs):
            from cellvec.errors import CellvecError
            from cellvec.storage import parse_options, store_location

            if store is not None:
                try:
                    store = store_location(store, parse_options(storage_option))
                except CellvecError as e:
                    raise click.BadParameter(str(e), param_hint="--store") from e
            elif storage_option:
                raise click.UsageError("--storage-option applies to a --store: give one.")
            return f(*args, store=store, **kwargs)

        wrapper = click.option(
            "--storage-option",
            multiple=True,
            metavar="KEY=VALUE",
            help="Object-store option for Lance (repeatable), e.g. aws_region=eu-west-1, "
            "aws_endpoint=http://127.0.0.1:9000, allow_http=true; also from $AWS_* and "
            "$CELLVEC_STORAGE_OPTIONS (JSON).",
        )(wrapper)
        return click.option("--store", required=required, metavar="PATH_OR_URI", help=help)(wrapper)

    return decorate


store_option = store_options()

ray_option = click.option(
    "--ray",
    "ray",
    is_flag=False,
    flag_value="default",
    default=None,
    envvar="CELLVEC_RAY_ADDRESS",
    metavar="[ADDRESS]",
    help="Run the parallel stages on a Ray cluster (pip install 'cellvec[ray]'). A bare "
    "--ray joins the cluster running on this machine or starts a local one (127.0.0.1 "
    "only); or auto, HOST:PORT, ray://HOST:10001. Default: $CELLVEC_RAY_ADDRESS. A bare "
    "--ray takes the next word as its address unless an option follows: put it last.",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout."
)


def model_option(default: str | None = None, multiple: bool = False):
    return click.option(
        "--model",
        default=() if multiple else default,
        multiple=multiple,
        show_default=default is not None,
        help="Embedding model: minilm, st:NAME_OR_PATH, hf:NAME_OR_PATH, openai:MODEL, or an imported name."
        + (" Repeat to compare models." if multiple else ""),
    )


READ_OPTIONS = ("layer", "use_raw", "gene_column", "transpose")
RECIPE_OPTIONS = (
    "top_genes",
    "weighting",
    "background",
    "skip_genes",
    "center",
    "refine",
    "adapt_genes",
)


def _gathered(f, names: tuple[str, ...], into: str, make):
    """`f` called with the options `names` gathered into one argument `into` (`make(**them)`)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **{into: make(**{k: kwargs.pop(k) for k in names})}, **kwargs)

    return wrapper


def input_options(f):
    """Where the expression values are read from; the command gets them as one dict,
    `read_options`, the keywords of `read_expression`."""
    f = _gathered(f, READ_OPTIONS, "read_options", dict)
    f = click.option(
        "--transpose", is_flag=True, help="CSV/TSV input has genes as rows and cells as columns."
    )(f)
    f = click.option("--gene-column", help="var column holding gene symbols (default: var_names).")(
        f
    )
    f = click.option(
        "--use-raw/--no-raw", default=None, help="Read .raw (default: only when X is scaled)."
    )(f)
    f = click.option("--layer", help="Read this AnnData layer instead of X.")(f)
    return f


def recipe_options(f):
    """How cells become vectors; the defaults are `Recipe`'s own. The command gets them
    as one `recipe` (a `Recipe`)."""
    f = _gathered(f, RECIPE_OPTIONS, "recipe", Recipe)
    f = click.option(
        "--adapt-genes/--no-adapt-genes",
        default=Recipe.adapt_genes,
        show_default=True,
        help="Refinement also learns per-gene gates and corrections of the gene vectors.",
    )(f)
    f = click.option(
        "--center/--no-center",
        default=Recipe.center,
        show_default=True,
        help="Subtract the reference's mean cell vector (the background all cells share).",
    )(f)
    f = click.option(
        "--refine",
        type=click.Choice(REFINES),
        default=Recipe.refine,
        show_default=True,
        help="Contrastive refinement on the reference (supcon needs labels; simclr does not).",
    )(f)
    f = click.option(
        "--skip-genes",
        type=click.Choice(SKIP_GENES),
        default=Recipe.skip_genes,
        show_default=True,
        help="Leave a gene program out of every cell's top genes: ribosomal, the cytosolic "
        "ribosomal proteins (their level follows species and protocol more than cell type).",
    )(f)
    f = click.option(
        "--background",
        type=click.Choice(BACKGROUNDS),
        default=Recipe.background,
        show_default=True,
        help="Remove what all gene vectors share (fitted on the reference's genes).",
    )(f)
    f = click.option(
        "--weighting",
        type=click.Choice(WEIGHTINGS),
        default=Recipe.weighting,
        show_default=True,
        help="Weights of a cell's top genes: value (log expression), log1p, rank, softmax "
        "(the expression itself, 1 + CP10k: for an atlas that maps other species' cells; it "
        "loses within a species) or sqrt (its square root: between the two). README, "
        "'Other species'.",
    )(f)
    f = click.option(
        "--top-genes",
        default=Recipe.top_genes,
        show_default=True,
        help="Most-expressed genes per cell.",
    )(f)
    return f


def emit_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=_default)
    sys.stdout.write("\n")


def _default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
