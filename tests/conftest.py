import sys
from pathlib import Path

import pytest

pytest_plugins = ["host.testing"]

sys.path.insert(0, str(Path(__file__).parent))

from distfactory import make_plugin_dist  # noqa: E402

GOOD = '''
from host import hookimpl
host_api = ">=1.0,<2"

@hookimpl
def on_message(message):
    return "good: " + message.text
'''

BROKEN_IMPORT = '''
import module_that_does_not_exist  # noqa
'''

MISSPELT = '''
from host import hookimpl

@hookimpl
def on_mesage(message):
    return "never"
'''

INCOMPATIBLE = '''
from host import hookimpl
host_api = ">=2.0,<3"

@hookimpl
def on_message(message):
    return "from the future"
'''

WITH_COMMAND = '''
from host import hookimpl

def _configure(parser):
    parser.add_argument("--name", default="world")

def _run(args):
    print(f"hello {args.name}")
    return 3

@hookimpl
def register_commands(register):
    register("greet", _run, help="say hello", configure=_configure)
'''


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """A directory of real plugin distributions: good, broken import, misspelt hook, incompatible."""
    root = tmp_path / "site"
    make_plugin_dist(root, dist="host-good", module="host_good", code=GOOD, entry_name="good")
    make_plugin_dist(root, dist="host-broken", module="host_broken", code=BROKEN_IMPORT, entry_name="broken")
    make_plugin_dist(root, dist="host-misspelt", module="host_misspelt", code=MISSPELT, entry_name="misspelt")
    make_plugin_dist(
        root, dist="host-future", module="host_future", code=INCOMPATIBLE, entry_name="future", version="9.0.0"
    )
    make_plugin_dist(root, dist="host-greeter", module="host_greeter", code=WITH_COMMAND, entry_name="greeter")
    return root
