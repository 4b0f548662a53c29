"""Citadel's HTTP edge, read in the order a request meets it.

- :mod:`~citadel.http.serving`: the uvicorn settings every server runs with.
- :mod:`~citadel.http.protocol`: the HTTP/1.1 protocol (head limit and
  deadline, no upgrades, lingering close), with :mod:`~citadel.http.framing`
  (where messages end) and :mod:`~citadel.http.refusals` (its own answers).
- :mod:`~citadel.http.request_ids`: one rule for a request's id, shared by
  the protocol and the pipeline.
- :mod:`~citadel.http.pipeline`: the operations' ordered steps, using
  :mod:`~citadel.http.head` (the header fields), :mod:`~citadel.http.addresses`
  (the client address behind trusted proxies) and :mod:`~citadel.http.body`
  (size limit and read deadline).
- :mod:`~citadel.http.operations`: the four operations, on the models of
  :mod:`~citadel.http.bodies`; they import nothing of the pipeline.
  :mod:`~citadel.http.answers` describes what they answer.
- :mod:`~citadel.http.errors`: errors to HTTP, in one place.
- :mod:`~citadel.http.other_paths`, :mod:`~citadel.http.status_routes`,
  :mod:`~citadel.http.openapi`: what FastAPI serves.
"""
