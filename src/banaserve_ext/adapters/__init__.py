# SPDX-License-Identifier: Apache-2.0
"""Adapters to serving engines. Each imports its engine lazily."""
