# SPDX-License-Identifier: Apache-2.0
"""The live BanaServe controller: it reads every SGLang instance's signals (measured by the
plug-in, :mod:`banaserve_ext.adapters.sglang.signals`) and the router's in-flight counts once
per window, builds :class:`~banaserve_ext.control.InstanceView`\\ s, runs the same
:class:`~banaserve_ext.control.BanaServeController` the simulator runs, and carries its decisions
out on the real deployment (:mod:`.actuators`). ``banaserve control`` runs it; ``banaserve
status`` shows it."""
