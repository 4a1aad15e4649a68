"""What every command shares: consoles, the error boundary, JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from duquant_cli.errors import DuQuantError

out = Console()
err = Console(stderr=True)
debug = {"on": False}


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map the project's errors (and OS errors) to one line on stderr and exit code 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DuQuantError, OSError) as exc:
            if debug["on"]:
                raise
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            err.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]: nothing was published")
            raise typer.Exit(130) from None

    return wrapper


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
