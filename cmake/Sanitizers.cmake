# SPDX-License-Identifier: Apache-2.0
# With BANASERVE_SANITIZE=ON every target (the Python module included) is built with ASan+UBSan.
# Run Python against such a build with LD_PRELOAD=$(g++ -print-file-name=libasan.so).
if(BANASERVE_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g)
  add_link_options(-fsanitize=address,undefined)
endif()
