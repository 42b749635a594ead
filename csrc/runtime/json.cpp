#include "runtime/json.h"

#include <cstdlib>

#include "llamas/error.h"

namespace llamas {
namespace {

class Parser {
 public:
  Parser(const std::string& text, const std::string& what) : s_(text), what_(what) {}

  JsonValue parse_document() {
    JsonValue v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) error("unexpected trailing characters");
    return v;
  }

 private:
  [[noreturn]] void error(const char* msg) { fail("json", what_, ": ", msg, " at offset ", pos_); }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }

  char peek() {
    skip_ws();
    if (pos_ >= s_.size()) error("unexpected end of text");
    return s_[pos_];
  }

  void expect(char c) {
    if (peek() != c) error((std::string("expected '") + c + "'").c_str());
    ++pos_;
  }

  JsonValue parse_value(int depth) {
    if (depth > 64) error("nesting too deep");
    char c = peek();
    JsonValue v;
    if (c == '{') {
      v.kind = JsonValue::Kind::Object;
      ++pos_;
      if (peek() == '}') { ++pos_; return v; }
      for (;;) {
        if (peek() != '"') error("expected a string key");
        std::string key = parse_string();
        expect(':');
        v.object.emplace_back(std::move(key), parse_value(depth + 1));
        char d = peek();
        ++pos_;
        if (d == '}') break;
        if (d != ',') error("expected ',' or '}'");
      }
    } else if (c == '[') {
      v.kind = JsonValue::Kind::Array;
      ++pos_;
      if (peek() == ']') { ++pos_; return v; }
      for (;;) {
        v.array.push_back(parse_value(depth + 1));
        char d = peek();
        ++pos_;
        if (d == ']') break;
        if (d != ',') error("expected ',' or ']'");
      }
    } else if (c == '"') {
      v.kind = JsonValue::Kind::String;
      v.string = parse_string();
    } else if (s_.compare(pos_, 4, "true") == 0) {
      v.kind = JsonValue::Kind::Bool, v.boolean = true, pos_ += 4;
    } else if (s_.compare(pos_, 5, "false") == 0) {
      v.kind = JsonValue::Kind::Bool, pos_ += 5;
    } else if (s_.compare(pos_, 4, "null") == 0) {
      pos_ += 4;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      v.kind = JsonValue::Kind::Number;
      size_t start = pos_;
      bool integer = true;
      if (s_[pos_] == '-') ++pos_;
      while (pos_ < s_.size()) {
        char d = s_[pos_];
        if (d >= '0' && d <= '9') { ++pos_; continue; }
        if (d == '.' || d == 'e' || d == 'E' || d == '+' || d == '-') { integer = false; ++pos_; continue; }
        break;
      }
      std::string num = s_.substr(start, pos_ - start);
      char* end = nullptr;
      v.number = std::strtod(num.c_str(), &end);
      if (end != num.c_str() + num.size()) error("malformed number");
      if (integer) {
        v.is_integer = true;
        v.integer = std::strtoll(num.c_str(), nullptr, 10);
      }
    } else {
      error("unexpected character");
    }
    return v;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) error("unterminated string");
      char c = s_[pos_++];
      if (c == '"') break;
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) error("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          if (pos_ + 4 > s_.size()) error("short \\u escape");
          unsigned code = std::strtoul(s_.substr(pos_, 4).c_str(), nullptr, 16);
          pos_ += 4;
          // Names in weight files are ASCII; other code points are kept as UTF-8 (BMP only).
          if (code < 0x80) out += char(code);
          else if (code < 0x800) { out += char(0xC0 | (code >> 6)); out += char(0x80 | (code & 0x3F)); }
          else { out += char(0xE0 | (code >> 12)); out += char(0x80 | ((code >> 6) & 0x3F)); out += char(0x80 | (code & 0x3F)); }
          break;
        }
        default: error("unknown escape");
      }
    }
    return out;
  }

  const std::string& s_;
  std::string what_;
  size_t pos_ = 0;
};

}  // namespace

const JsonValue* JsonValue::find(const std::string& key) const {
  for (auto& kv : object)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

JsonValue parse_json(const std::string& text, const std::string& what) { return Parser(text, what).parse_document(); }

}  // namespace llamas
