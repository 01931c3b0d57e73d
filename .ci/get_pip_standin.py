"""Stand-in for ansible-test's get-pip bootstrap script, for machines that reach PyPI but not ansible's CI files.

ansible-test runs ``python get_pip_<version>.py [pip options] pip==<version> --no-setuptools --no-wheel``
inside each fresh sanity virtual environment, with a scrubbed environment. This installs pip from the
wheel whose path .ci/sanity.sh writes in place of the placeholder below.
"""

import sys

wheel = "@PIP_WHEEL@"
sys.path.insert(0, wheel)

from pip._internal.cli.main import main  # noqa: E402

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel") and not a.startswith("pip==")]
sys.exit(main(["install", "--no-index", "--ignore-installed", *args, wheel]))
