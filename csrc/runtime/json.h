#pragma once
// A small JSON reader, enough for safetensors headers (objects, arrays, strings, integers).
// Errors name the position in the text.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace llamas {

struct JsonValue {
  enum class Kind { Null, Bool, Number, String, Array, Object } kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;
  bool is_integer = false;
  int64_t integer = 0;
  std::string string;
  std::vector<JsonValue> array;
  std::vector<std::pair<std::string, JsonValue>> object;  // in file order

  const JsonValue* find(const std::string& key) const;
};

// Throws llamas::Error("[json] ... at offset N") on malformed input; `what` names the source.
JsonValue parse_json(const std::string& text, const std::string& what);

}  // namespace llamas
