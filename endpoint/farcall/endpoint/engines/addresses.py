"""``engine.address``: where a Parsl engine's workers reach its interchange, in every form a
Globus Compute config writes it.

The address is a plain string (``10.0.0.5``, ``login1.cluster.org``) or one of Parsl's own
address functions named as a mapping: ``{type: address_by_interface, ifname: ib0}``,
``{type: address_by_route}``, ``{type: address_by_hostname}``, ``{type: address_by_query}``.
The forms and their arguments are read from ``parsl.addresses``, and a mapping is resolved
by calling Parsl's function, so farcall finds the same address Parsl would.

Reading the config checks only the form. ``prepare`` (``farcall-endpoint check``) resolves
what it can here: an interface this host lacks is a warning there, because a cluster config
is often checked away from the cluster, while ``start`` refuses it (its check runs inside
:func:`resolving_here`, before it registers or connects), naming the interfaces this host
has. ``address_by_query`` asks a public web service, so only the engine's start calls it.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from farcall.endpoint import problems

KEY = "engine.address"
NETWORKED = frozenset({"address_by_query"})
"""Forms that contact a service outside this host to resolve (only ``start`` calls them)."""

_here: contextvars.ContextVar[bool] = contextvars.ContextVar("farcall_address_here", default=False)


@contextlib.contextmanager
def resolving_here() -> Iterator[None]:
    """Inside the block, ``prepare`` treats an address that does not resolve on this host as
    an error, not a warning: ``farcall-endpoint start`` checks this way, since the engine
    starts here."""
    token = _here.set(True)
    try:
        yield
    finally:
        _here.reset(token)


def must_resolve_here() -> bool:
    """True inside :func:`resolving_here`."""
    return _here.get()


def forms() -> dict[str, Callable[..., str]]:
    """Parsl's address functions by name (``address_by_*`` in ``parsl.addresses``)."""
    import parsl.addresses

    return {name: getattr(parsl.addresses, name) for name in sorted(dir(parsl.addresses))
            if name.startswith("address_by_") and callable(getattr(parsl.addresses, name))}


def accepted() -> str:
    """The accepted forms, as a config would write them (for error messages)."""
    shapes = ["a plain address or host name string ('10.0.0.5')"]
    for name, fn in forms().items():
        args = ", ".join(f"{p}: ..." for p in inspect.signature(fn).parameters)
        shapes.append("{type: " + name + (", " + args if args else "") + "}")
    return "; ".join(shapes)


def check_address(value: Any) -> bool:
    """Record a problem for an ``engine.address`` that is not an accepted form; True if good."""
    if isinstance(value, str):
        if not value.strip():
            problems.error(KEY, f"empty address; write one of: {accepted()}")
            return False
        return True
    if not isinstance(value, Mapping):
        problems.error(KEY, f"{value!r} is not an address; write one of: {accepted()}")
        return False
    kinds = forms()
    args = dict(value)
    kind = args.pop("type", None)
    if kind not in kinds:
        problems.error(f"{KEY}.type", f"{kind!r} is not one of Parsl's address functions "
                                      f"({', '.join(kinds)}); write one of: {accepted()}")
        return False
    signature = inspect.signature(kinds[kind])
    good = True
    for key in args:
        if key not in signature.parameters:
            valid = ", ".join(signature.parameters) or "none"
            problems.error(f"{KEY}.{key}", f"not an argument of {kind} (its arguments: {valid})")
            good = False
    for name, param in signature.parameters.items():
        if param.default is param.empty and name not in args:
            problems.error(f"{KEY}.{name}", f"{kind} needs {name} (e.g. {{type: {kind}, "
                                            f"{name}: ib0}})")
            good = False
    if kind == "address_by_interface" and "ifname" in args and not isinstance(args["ifname"], str):
        problems.error(f"{KEY}.ifname", f"must be an interface name such as ib0, got "
                                        f"{args['ifname']!r}")
        good = False
    return good


def describe(value: str | Mapping[str, Any]) -> str:
    """The address as the config wrote it, in one line."""
    if isinstance(value, str):
        return value
    args = ", ".join(f"{k}={v}" for k, v in value.items() if k != "type")
    return f"{value.get('type')}({args})"


def interfaces() -> dict[str, list[str]]:
    """This host's network interfaces and their IPv4 addresses."""
    import psutil

    found: dict[str, list[str]] = {name: [] for _, name in socket.if_nameindex()}
    for name, addrs in psutil.net_if_addrs().items():
        found.setdefault(name, []).extend(a.address for a in addrs if a.family == socket.AF_INET)
    return found


def _interfaces_text() -> str:
    return ", ".join(f"{name} ({', '.join(addrs)})" if addrs else f"{name} (no IPv4 address)"
                     for name, addrs in interfaces().items())


def resolve(value: str | Mapping[str, Any], *, on_this_host: bool,
            networked: bool = True) -> str | None:
    """The address workers connect to, resolved as Parsl resolves it.

    ``on_this_host``: an address that does not resolve here is an error naming this host's
    interfaces (``problems.error``: ``EndpointConfigError`` outside a check); otherwise it is
    a warning. Either way the result is None then. Without
    ``networked`` (``prepare``), ``address_by_query`` is not asked (None).
    """
    if isinstance(value, str):
        return value
    args = dict(value)
    kind = str(args.pop("type"))
    if kind in NETWORKED and not networked:
        return None
    try:
        return str(forms()[kind](**args))
    except Exception as e:  # noqa: BLE001 - OSError for an interface, requests' errors, ...
        found = f"{describe(value)} does not resolve on this host ({type(e).__name__}: {e})"
        if kind == "address_by_interface":
            found = (f"interface {args.get('ifname')!r} is not on this host (or has no IPv4 "
                     f"address); the interfaces here are: {_interfaces_text()}")
        if on_this_host:
            problems.error(KEY, f"{found}. Write the interface that reaches the workers from "
                                f"this host as ifname, or another form: {accepted()}")
            return None
        problems.warn(KEY, f"{found}. farcall resolves it when the endpoint starts, where it must "
                           "resolve (run `farcall-endpoint check` on the host the endpoint runs "
                           "on to be sure)")
        return None
