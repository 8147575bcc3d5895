# SPDX-License-Identifier: Apache-2.0
"""Standard benchmarks (``python -m banaserve_ext.bench …`` / ``banaserve bench …``).

Each benchmark measures our component and, when installed in a scratch venv, the peer system on
the same workload in the same run, and reports ratios. They are never part of the test suite.
"""
