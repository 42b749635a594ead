#include "llamas/error.h"

namespace llamas {

void fail_text(const char* op, const char* message) { fail(op, message); }

}  // namespace llamas
