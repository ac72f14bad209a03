# SuperLink image: Flower's official one, pinned to the flwr version of pyproject.toml.
#
# Why not the official image as it is: the SuperLink database lives in a named volume at
# /app/state; creating the folder here, owned by the image's non-root user `app` (uid 49999),
# makes a fresh volume start with that owner, so the SuperLink can write to it.
FROM flwr/superlink:1.42.0

RUN mkdir -p /app/state

USER app
ENTRYPOINT ["flower-superlink"]
