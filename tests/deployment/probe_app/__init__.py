"""A throwaway Flower app (numpy only) that proves the deployment topology on its own.

The deployment test runs it before the real app: if it fails, TLS, node authentication or
the process layout is broken; if only the real app fails, the app is. The ServerApp records
which SuperNodes replied, so the test can check that an unregistered SuperNode got no task.
"""
