"""Names for the emulated hosts, so that each namespace resolves its peers' addresses.

Gloo and the c10d store look up the name of every peer address they accept a connection from;
inside a bare namespace that lookup fails and c10d prints "The hostname of the client socket
cannot be retrieved" for every connection. ``ip netns exec NS`` bind-mounts the files of
``/etc/netns/NS/`` over ``/etc/``, so one ``hosts`` file per host namespace, naming every host's
address (``10.x.y.z  <prefix>-h<i>``), makes those lookups succeed without touching the machine's
own ``/etc/hosts``.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

ETC_NETNS = Path("/etc/netns")


def hosts_text(names_and_ips: list[tuple[str, str]], base: str = "") -> str:
    """The content of a namespace's ``/etc/hosts``: ``base`` (the machine's own file), then one
    line per emulated host for its IPv4 address and for that address mapped into IPv6 (the form
    in which a dual-stack listener such as the c10d store sees its peers)."""
    lines = base.rstrip("\n").splitlines() if base.strip() else ["127.0.0.1\tlocalhost", "::1\tlocalhost"]
    lines += [f"{ip}\t{name}" for name, ip in names_and_ips]
    lines += [f"::ffff:{ip}\t{name}" for name, ip in names_and_ips]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def host_names(cluster, root: Path = ETC_NETNS) -> Iterator[list[str]]:
    """Give every host of ``cluster`` (an up :class:`lina.cluster.lifecycle.EmulatedCluster`) a
    ``hosts`` file naming all hosts while the block runs; yields the host names (index order).
    Folders this created are removed afterwards; existing ones are left as they were."""
    names = [f"{cluster.prefix}-h{h.index}" for h in cluster.hosts]
    try:
        base = Path("/etc/hosts").read_text()
    except OSError:
        base = ""
    text = hosts_text([(name, h.ip) for name, h in zip(names, cluster.hosts)], base)
    created: list[Path] = []
    written: list[Path] = []
    try:
        for h in cluster.hosts:
            folder = root / h.netns
            if not folder.exists():
                folder.mkdir(parents=True)
                created.append(folder)
            path = folder / "hosts"
            if not path.exists():
                path.write_text(text)
                written.append(path)
        yield names
    finally:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
