// SPDX-License-Identifier: Apache-2.0
#include "banaserve/transfer/types.h"
