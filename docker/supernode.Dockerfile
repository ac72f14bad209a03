# SuperNode image: Flower's official one, pinned to the flwr version of pyproject.toml.
#
# The SuperNode runs no app code (--isolation process): the ClientApp runs in the site's
# SuperExec container (superexec.Dockerfile), which also holds the site's data, read-only.
# Credentials (CA certificate, the site's private key) are mounted at run time, never baked in.
FROM flwr/supernode:1.42.0

USER app
ENTRYPOINT ["flower-supernode"]
