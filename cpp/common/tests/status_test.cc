// SPDX-License-Identifier: Apache-2.0
// The one list of status codes: values contiguous from kOk = 0, every code named, Status keeps
// its code. (banaserve_ext.errors is checked against the same list through the bindings.)
#include <set>
#include <string>

#include "banaserve/common/status.h"
#include "check.h"

using namespace banaserve;

TEST_CASE(codes_are_contiguous_from_ok_and_named_once) {
  std::set<std::string> names;
  int expected = 0;
  for (StatusCode code : kAllStatusCodes) {
    CHECK_EQ(static_cast<int>(code), expected++);
    const std::string name = status_code_name(code);
    CHECK(name != "Unknown");
    CHECK(names.insert(name).second);
  }
  CHECK_EQ(kAllStatusCodes[0], StatusCode::kOk);
  CHECK_EQ(std::string(status_code_name(static_cast<StatusCode>(expected))), std::string("Unknown"));
}

TEST_CASE(status_keeps_its_code_and_prints_its_name) {
  for (StatusCode code : kAllStatusCodes) {
    Status st(code, "why");
    CHECK_EQ(st.code(), code);
    CHECK_EQ(st.ok(), code == StatusCode::kOk);
    if (code != StatusCode::kOk) {
      CHECK_EQ(st.to_string(), std::string(status_code_name(code)) + ": why");
    }
  }
  CHECK_EQ(std::string(status_code_name(StatusCode::kTimeout)), std::string("Timeout"));
  CHECK_CODE(BANASERVE_INVALID("x"), StatusCode::kInvalidArgument);
}

int main() { return banaserve::testing::run_all(); }
