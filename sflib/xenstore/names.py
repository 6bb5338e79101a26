"""Node names: validation and resolution of relative paths (pure).

Xen's rules (is_valid_nodename in cxenstored): characters [A-Za-z0-9/_@-], no
"//", no trailing "/" except the root, absolute length <= 3072, relative <= 2048.
A relative path is resolved under the connection's /local/domain/<domid>.
Names starting with "@" are special watch paths (@introduceDomain,
@releaseDomain) and valid only for WATCH and UNWATCH.
"""

from __future__ import annotations

import errno
import re

from sflib.xenstore.wire import ABS_PATH_MAX, REL_PATH_MAX, XenStoreError

_VALID = re.compile(r"^[A-Za-z0-9/_@-]*$")
SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def resolve(path: str, domid: int) -> str:
    """The absolute, validated form of path for a connection of domid; EINVAL if bad."""
    if not path or not _VALID.match(path):
        raise XenStoreError(errno.EINVAL, f"invalid node name {path!r}")
    if path.startswith("/"):
        limit, absolute = ABS_PATH_MAX, path
    else:
        limit, absolute = REL_PATH_MAX, f"{domain_path(domid)}/{path}"
    if len(path) > limit:
        raise XenStoreError(errno.EINVAL, "node name too long")
    if "//" in absolute or (absolute != "/" and absolute.endswith("/")) or "@" in absolute:
        raise XenStoreError(errno.EINVAL, f"invalid node name {path!r}")
    return absolute


def resolve_watch(path: str, domid: int) -> str:
    """As resolve(), but special "@" watch paths are allowed as they are."""
    if path in SPECIAL_WATCHES:
        return path
    return resolve(path, domid)


def parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def join(path: str, child: str) -> str:
    return f"/{child}" if path == "/" else f"{path}/{child}"


def is_within(path: str, top: str) -> bool:
    """True if path is top or lies below it (by whole components)."""
    return top in ("/", path) or path.startswith(top + "/")


def relative_to_domain(path: str, domid: int) -> str:
    """How a domain that used a relative path expects to see path in an event."""
    prefix = domain_path(domid) + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path
