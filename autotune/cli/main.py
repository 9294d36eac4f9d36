"""The ``autotune`` command line: ``make_cli(pm)`` builds it, ``main()`` runs it."""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys

import click
import pluggy

from autotune import __version__
from autotune.cli.options import with_stages
from autotune.plugin.manager import use
from autotune.util.errors import AutotuneError, PluginError
from autotune.run.checkpoints import STOPPING
from autotune.util.quiet import loud_libraries, offline, quiet_libraries, tolerant_stderr

COMMANDS = ("models", "probe", "gpus", "estimate", "plan", "explain", "run", "report", "merge",
            "generate", "plugins", "completion", "calibrate", "export")


def _set_quiet(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.find_root().meta["autotune.quiet"] = True


def _set_verbose(_ctx, _param, value: bool) -> None:
    if value:
        loud_libraries()


def _shared_options() -> list[click.Option]:
    """-q and -v, taken before or after the command's name."""
    return [click.Option(["-q", "--quiet"], is_flag=True, expose_value=False,
                         callback=_set_quiet, help="No progress lines on stderr."),
            click.Option(["-v", "--verbose"], is_flag=True, expose_value=False,
                         callback=_set_verbose,
                         help="Show the libraries' warnings and progress bars too.")]


class Autotune(click.Group):
    """The command group: each command takes -q/-v after its name too (`autotune run --demo -q`).

    The built-in commands are imported when first asked for (a command's own imports are
    most of a quick command's time): ``builtin`` maps each name to the plugin manager."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.builtin: dict[str, pluggy.PluginManager] = {}

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        taken = {opt for param in cmd.params for opt in getattr(param, "opts", ())}
        cmd.params += [option for option in _shared_options() if not taken & set(option.opts)]
        super().add_command(cmd, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.builtin})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.builtin and cmd_name not in self.commands:
            module = importlib.import_module(f"autotune.cli.{cmd_name}")
            self.add_command(with_stages(module.command, self.builtin[cmd_name]), cmd_name)
        return self.commands.get(cmd_name)


def make_cli(pm: pluggy.PluginManager) -> click.Group:
    """Build the CLI for one plugin manager (tests pass their own)."""

    @click.group(cls=Autotune, params=_shared_options(),
                 context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="autotune")
    @click.pass_context
    def cli(ctx: click.Context) -> None:
        """Hardware-aware auto-tuner for fine-tuning large language models.

        \b
        autotune plan --model deepseek-7b                the best recipes, per card
        autotune plan --model deepseek-7b --gpu rtx3090 -o plan.yaml
        autotune explain plan.yaml                       why, and what else costs
        autotune run plan.yaml --data train.jsonl        train it (autotune run --demo)
        autotune estimate --model deepseek-7b --method lora --rank 16
        autotune probe                                   what GPUs this machine has
        autotune models                                  model profiles and aliases
        """
        ctx.obj = pm

    use(pm)
    for impl in reversed(pm.hook.register_commands.get_hookimpls()):  # pluggy's order
        try:
            impl.function(**{name: cli for name in impl.argnames})  # as pluggy calls it
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # named, not a traceback
            raise PluginError(f"plugin {impl.plugin_name!r} failed in register_commands: "
                              f"{type(exc).__name__}: {exc}") from exc
        replaced = sorted(set(COMMANDS) & set(cli.commands))
        if replaced:  # built-in commands keep working, whatever a plugin registers
            for name in replaced:
                del cli.commands[name]
            click.echo(f"autotune: warning: plugin {impl.plugin_name!r} may not replace the "
                       f"built-in command(s) {', '.join(replaced)}: ignored", err=True)
    cli.builtin = dict.fromkeys(COMMANDS, pm)
    return cli


def _ignore_signals() -> None:
    """At exit the command is done: a late Ctrl-C, SIGTERM or SIGHUP has nothing left to
    stop."""
    for number in STOPPING:
        signal.signal(number, signal.SIG_IGN)


def main() -> None:
    """Entry point of the ``autotune`` script: errors end in one line, not a traceback."""
    quiet_libraries()
    offline()
    tolerant_stderr()
    try:
        _check_arguments(sys.argv[1:])
        from autotune.plugin.manager import get_plugin_manager

        make_cli(get_plugin_manager()).main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("autotune: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors too: one line, as every error
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            names, ctx = [], exc.ctx
            while ctx.parent is not None:  # the command's path, whatever started the program
                names.insert(0, ctx.info_name)
                ctx = ctx.parent
            hint = f" (see `{' '.join(['autotune', *names, '--help'])}`)"
        click.echo(f"autotune: error: {one_line(exc.format_message())}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except AutotuneError as exc:
        click.echo(f"autotune: error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("autotune: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 -- a bug still ends in one line unless debugging
        if os.environ.get("AUTOTUNE_DEBUG"):
            raise
        click.echo(f"autotune: internal error: {type(exc).__name__}: {one_line(str(exc))} "
                   "(set AUTOTUNE_DEBUG=1 for the traceback)", err=True)
        sys.exit(70)
    finally:
        # a signal while the interpreter shuts down would print a traceback from a finaliser:
        # registered last, this runs first at exit (before the finalisers the command's
        # imports registered, such as torch's)
        atexit.register(_ignore_signals)


def _check_arguments(arguments: list[str]) -> None:
    """Every argument is text: one that is not valid UTF-8 (bytes the terminal or a file
    name holds in another encoding) cannot go into the UTF-8 records autotune writes."""
    for argument in arguments:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            shown = argument.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise AutotuneError(f"the argument {shown!r} is not valid UTF-8: autotune keeps "
                                "what it is given in UTF-8 files (rename the file, or "
                                "re-encode the text)") from None


_LINE_BREAKS = {ord(c): c.encode("unicode_escape").decode()
                for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(message: str) -> str:
    """``message`` with its line breaks escaped (a path or a name the user typed may hold
    some): an error stays one line."""
    return message.translate(_LINE_BREAKS)
