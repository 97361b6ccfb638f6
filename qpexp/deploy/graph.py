"""The graph format's deployment check: since issue 22 the one path of :func:`qpexp.deploy.deploy`
(which picks the format); ``deploy_graph`` forces the graph format, as before."""

from __future__ import annotations

import functools

from qpexp.deploy import FILE_NAME, deploy  # noqa: F401

deploy_graph = functools.partial(deploy, graph=True)
