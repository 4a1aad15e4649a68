"""One writer per output: an exclusive lock file beside the pack folder.

Packs are built on shared machines; two runs aimed at the same folder would otherwise share the
temporary folder and publish a mix of both. The lock is a file created with O_CREAT|O_EXCL (atomic
on local file systems and NFSv3+) holding the owner's pid, host and process start time, so a lock
left by a killed run on this host is recognised as stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from pathlib import Path

from duquant_cli.errors import PackError


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


class WriterLock:
    """Held for a whole pack run: `acquire` refuses while a live run holds it; `release` removes it.

    Example:
        >>> with WriterLock(Path("packs/.m.lock"), "packs/m"):  # doctest: +SKIP
        ...     ...
    """

    def __init__(self, path: Path, target: str | Path) -> None:
        self.path = Path(path)
        self.target = str(target)
        self.token = uuid.uuid4().hex
        self.held = False

    def _record(self) -> str:
        pid = os.getpid()
        me = {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid)}
        return json.dumps(me | {"token": self.token}) + "\n"

    def _owner(self) -> tuple[dict | None, str]:
        try:
            text = self.path.read_text()
            data = json.loads(text)
        except FileNotFoundError:
            return None, ""
        except (OSError, ValueError, UnicodeDecodeError):
            return {}, ""
        return (data if isinstance(data, dict) else {}), text

    def _stale(self, owner: dict) -> bool:
        """A lock from this host whose process is gone (or whose pid now names another process)."""
        pid = owner.get("pid")
        if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
            return False
        if not _alive(pid):
            return True
        start = owner.get("start")
        return start is not None and _start_time(pid) not in (None, start)

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner, text = self._owner()
                if owner is None:  # released meanwhile: try again
                    continue
                if self._stale(owner) and self._break(text):
                    continue
                who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
                raise PackError(
                    f"{self.target}: another duquant pack is writing it ({who}); wait for it, "
                    f"or delete {self.path} if no pack is running"
                ) from None
            except OSError as exc:
                raise PackError(
                    f"{self.path.parent}: cannot write the pack here ({exc.strerror})"
                ) from None
            try:
                os.write(fd, self._record().encode())
            except OSError as exc:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise PackError(f"{self.path}: cannot write the lock ({exc.strerror})") from None
            os.close(fd)
            self.held = True
            return
        raise PackError(f"{self.target}: could not take the writer lock {self.path}; try again")

    def _break(self, seen: str) -> bool:
        """Remove a stale lock, unless another run replaced it since it was read."""
        grave = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, grave)
        except OSError:
            return True  # gone already: someone else broke it; retry the create
        try:
            if grave.read_text() != seen:  # a fresh lock was taken meanwhile: give it back
                with contextlib.suppress(OSError):
                    os.link(grave, self.path)
                return False
            return True
        finally:
            grave.unlink(missing_ok=True)

    def still_held(self) -> bool:
        """Whether the lock file is still this writer's (checked before publishing)."""
        owner, _ = self._owner()
        return bool(owner) and owner.get("token") == self.token

    def release(self) -> None:
        if self.held and self.still_held():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
