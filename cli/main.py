"""The `sparsemerge` command line: parse options, call one library function, print.

Heavy modules (torch, transformers, plotly) are imported inside commands, so `--help` is fast.
"""

from __future__ import annotations

import os
import sys

import click

from mergekit_sparse.errors import SparseMergeError


class Group(click.Group):
    """Turns the library's user errors into one `Error:` line and exit code 1 (no traceback), and click's
    usage errors into one `Error:` line and exit code 2 (no usage dump: `--help` shows it)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:  # bare `sparsemerge`: the help
                click.echo(e.ctx.get_help())
                sys.exit(0)
            where = e.ctx.command_path if e.ctx is not None else prog_name or "sparsemerge"
            message = " ".join(e.format_message().split())
            click.echo(f"Error: {message} (see `{where} --help`)", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"Error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SparseMergeError as e:
            from mergekit_sparse.analysis.describe import printable

            click.echo(f"Error: {printable(e)}", err=True)
            ctx.exit(1)

    ORDER = (
        "demo",
        "run",
        "inspect",
        "core",
        "overlap",
        "fuse",
        "gradients",
        "gallop",
        "train",
        "retrain",
        "eval",
        "forget",
    )

    def list_commands(self, ctx):  # the workflow's order, not the alphabet's
        return sorted(self.commands, key=lambda c: self.ORDER.index(c) if c in self.ORDER else len(self.ORDER))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mergekit-sparse")
def cli():
    """mergekit-sparse: find the parameters each fine-tuning task really changed, measure how the
    tasks overlap, fuse checkpoints without the tasks destroying each other (CPI-FT), and train
    only a sparse, well-chosen parameter set (GaLLoP).

    \b
    Start here:   sparsemerge demo
    Typical run:  sparsemerge core --base base/ math/ code/ --p 1 -o cores/
                  sparsemerge overlap cores/*.mask.safetensors --tau 0.1 --html overlap.html
                  sparsemerge fuse math/ code/ --base base/ --p 1 -o fused/
    """


def is_main_process() -> bool:
    """False on every rank but 0 under torchrun: one process prints (the others' output would repeat it)."""
    return os.environ.get("RANK", "0") == "0"


def emit(data: dict, as_json: bool, text: str) -> None:
    """Print either the JSON document or the human summary (rank 0 alone under torchrun)."""
    if not is_main_process():
        return
    if as_json:
        from mergekit_sparse.storage.atomic import dumps

        click.echo(dumps(data))
    else:
        click.echo(text)


def warn(message: str) -> None:
    """A warning on stderr (never mixed into --json output; rank 0 alone under torchrun)."""
    if not is_main_process():
        return
    click.echo(f"warning: {message}", err=True)


def open_base(base, task_cks, *, force: bool = False, allow_pickle: bool = False):
    """The base checkpoint: `--base` (checked against the tasks' records), or found per METHODS §9, which
    the console is told."""
    from mergekit_sparse.storage.base import resolve_base
    from mergekit_sparse.storage.checkpoint import Checkpoint

    given = Checkpoint.open(base, allow_pickle=allow_pickle) if base else None
    ck, how = resolve_base(task_cks, given, force=force, allow_pickle=allow_pickle)
    if given is None:
        click.echo(f"base: {ck.path} ({how})", err=True)
    return ck


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (for scripts).")(f)


def plotly_option(f):
    return click.option(
        "--plotly",
        "plotly_mode",
        type=click.Choice(["inline", "cdn"]),
        default="inline",
        show_default=True,
        help="How a report gets plotly.js: inlined (works offline, ~5 MB) or linked from cdn.plot.ly (~0.3 MB, "
        "needs a network to view).",
    )(f)


def force_option(f):
    return click.option("--force", is_flag=True, help="Replace an existing output.")(f)


def scope_options(f):
    f = click.option(
        "--exclude",
        multiple=True,
        metavar="REGEX",
        help="Leave out tensors whose name matches (repeatable), e.g. 'embed|lm_head'.",
    )(f)
    f = click.option(
        "--include",
        multiple=True,
        metavar="REGEX",
        help="Only tensors whose name matches (repeatable); default: all floating tensors.",
    )(f)
    return f


def pickle_option(f):
    return click.option(
        "--allow-pickle", is_flag=True, help="Load pickled .bin/.pt weights with torch.load(weights_only=True)."
    )(f)


class SpecType(click.ParamType):
    """A click type that validates with a setting's Spec, so the CLI and configs give one message."""

    def __init__(self, spec):
        self.spec = spec
        self.name = spec.kind.__name__ if not spec.choices else "choice"

    def get_metavar(self, param, ctx=None):
        if self.spec.choices:
            return "[" + "|".join(self.spec.choices) + "]"
        return {"int": "INTEGER", "float": "FLOAT"}.get(self.name, self.name.upper())

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or self.spec.choices:
            v = value
        else:
            try:
                v = int(value) if self.spec.kind is int else float(value) if self.spec.kind is float else value
            except ValueError:
                self.fail(
                    f"expected {'an integer' if self.spec.kind is int else 'a number'}, got {value!r}", param, ctx
                )
        why = self.spec.problem(v)
        if why:
            self.fail(why, param, ctx)
        return v


def spec_option(cls, name: str, *flags: str, default=..., **kw):
    """A click option for setting `name` of the settings dataclass `cls`: its type, range, default and
    help come from the declaration (`mergekit_sparse.settings`); `default` overrides the default."""
    from dataclasses import fields

    from mergekit_sparse.settings import spec_of

    spec = spec_of(cls, name)
    if default is ...:
        default = next(f.default for f in fields(cls) if f.name == name)
    flags = flags or ("--" + name.replace("_", "-"),)
    help_text = kw.pop("help", spec.help)
    if not spec.choices and (spec.lo is not None or spec.hi is not None):
        help_text = f"{help_text} Range {spec.range_text()}.".strip()
    return click.option(
        *flags, type=SpecType(spec), default=default, show_default=default is not None, help=help_text, **kw
    )


def progress_enabled() -> bool:
    return sys.stderr.isatty()


from . import commands, eval_cmd, gallop_cmd, merge_cmd, overlap_cmd, run_cmd, train_cmd  # noqa: E402,F401  (registers the commands on `cli`)


def main() -> None:
    cli(prog_name="sparsemerge")


if __name__ == "__main__":
    main()
