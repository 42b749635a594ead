#pragma once
// Errors are exceptions that name the op (or file) and, where it helps, the expected against the
// actual value. The Python bindings turn llamas::Error into llamas.LlamasError (a ValueError).
#include <sstream>
#include <stdexcept>
#include <string>

namespace llamas {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
inline void append_all(std::ostringstream&) {}
template <typename T, typename... Rest>
void append_all(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  append_all(os, rest...);
}
}  // namespace detail

// Builds "[op] message parts..." from any streamable values.
template <typename... Parts>
[[noreturn]] void fail(const char* op, const Parts&... parts) {
  std::ostringstream os;
  os << "[" << op << "] ";
  detail::append_all(os, parts...);
  throw Error(os.str());
}

// The same for one fixed message, defined out of line (core/error.cpp): the kernel variant files
// call this one, so they instantiate no error code that other files would share (see kv_block.h).
[[noreturn]] void fail_text(const char* op, const char* message);

}  // namespace llamas

#define LLAMAS_CHECK(cond, op, ...) \
  do {                              \
    if (!(cond)) ::llamas::fail(op, __VA_ARGS__); \
  } while (0)
