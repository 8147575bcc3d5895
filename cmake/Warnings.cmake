# SPDX-License-Identifier: Apache-2.0
# banaserve_set_warnings(target): the warning set every first-party target compiles with.
function(banaserve_set_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wno-unused-parameter)
endfunction()
