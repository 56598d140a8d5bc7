pytest_plugins = ["host.testing"]
