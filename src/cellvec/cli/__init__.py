"""The `cellvec` command line: thin click commands over the library.

Library errors (`CellvecError`) become one-line `click.ClickException`s here, in
one place; logs go to stderr, `--json` output to stdout.
"""

from __future__ import annotations

import errno
import inspect
import logging
import sys

import click

from cellvec import __version__
from cellvec.errors import CellvecError


class CellvecGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CellvecError as e:
            raise click.ClickException(str(e)) from e
        except (PermissionError, IsADirectoryError, NotADirectoryError) as e:
            # what the file system refused, named: a folder not writable, a path in the way
            raise click.ClickException(
                f"{e.filename or 'a file'}: {e.strerror or e}; give a path you can write "
                "(or read) there."
            ) from e
        except RuntimeError as e:
            if "permission denied" not in str(e).lower():
                raise
            # Lance's own IO errors: a store folder this user cannot write
            raise click.ClickException(
                f"The store cannot be written here (permission denied: "
                f"{str(e).splitlines()[0][:200]}); use a store folder of yours."
            ) from e
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise click.ClickException(
                f"{e.filename or 'the output'}: no space left on the device; free some, or "
                "write elsewhere."
            ) from e


@click.group(cls=CellvecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cellvec")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def cli(verbose: int, quiet: bool):
    """cellvec: gene embeddings, cell vectors and subtype mapping onto reference atlases.

    \b
    Example:
      cellvec genes build --gene-info Mus_musculus.gene_info.gz --gene2go gene2go.gz \\
          --species mouse --model minilm --store store/
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in (
        "httpx",
        "sentence_transformers",
        "urllib3",
        "numba",
        "matplotlib",
        "lance",
        "lancedb",
        "faiss",  # faiss.loader reports a failed AVX2 load at INFO: reads like an error
    ):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _example_last(cmd: click.Command) -> None:
    """Move a docstring's trailing Example block into the epilog, so help ends with it."""
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            _example_last(sub)
    help_text = inspect.cleandoc(cmd.help or "")
    marker = help_text.find("\b\nExample:")
    if marker >= 0:
        cmd.help, cmd.epilog = help_text[:marker].rstrip(), help_text[marker:]


def _register():
    import importlib

    for module, names in _COMMANDS.items():
        mod = importlib.import_module(f"cellvec.cli.{module}")
        for name in names:
            cmd = getattr(mod, name)
            _example_last(cmd)
            cli.add_command(cmd)


_COMMANDS = {
    "genes": ["genes"],
    "atlas": ["atlas"],
    "prior": ["prior"],
    "map": ["map_cmd"],
    "evaluate": ["evaluate_cmd"],
    "sql": ["sql_cmd"],
    "serve": ["serve_cmd"],
    "report": ["report_cmd"],
    "explain": ["explain_cmd"],
    "demo": ["demo_cmd"],
}


_register()


def main():
    cli(prog_name="cellvec")
