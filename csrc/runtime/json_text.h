#pragma once
// The byte-level rules of JSON text both recognisers share (JSON mode's JsonState and the schema
// recogniser's strings and raw regex text): UTF-8 lead bytes and JSON's one-letter escapes.
#include <cstdint>

namespace llamas {

// A UTF-8 lead byte: how many continuation bytes follow, and the range [lo, hi] of the first of
// them (no overlong forms, no surrogates, nothing past U+10FFFF), so accepted text always decodes.
// False for a byte that cannot start a multi-byte character. The character's bits in the lead
// byte are byte & (0x7F >> (continuation + 1)).
inline bool utf8_lead(uint8_t byte, uint8_t* continuation, uint8_t* lo, uint8_t* hi) {
  if (byte >= 0xC2 && byte <= 0xDF) *continuation = 1;
  else if (byte >= 0xE0 && byte <= 0xEF) *continuation = 2;
  else if (byte >= 0xF0 && byte <= 0xF4) *continuation = 3;
  else return false;
  *lo = byte == 0xE0 ? 0xA0 : byte == 0xF0 ? 0x90 : 0x80;
  *hi = byte == 0xED ? 0x9F : byte == 0xF4 ? 0x8F : 0xBF;
  return true;
}

// JSON's one-letter escapes (after a backslash; \u is apart) and the characters they write.
constexpr char kJsonEscapes[] = "\"\\/bfnrt";
constexpr uint32_t kJsonEscaped[] = {'"', '\\', '/', 8, 12, 10, 13, 9};
constexpr int kJsonEscapeCount = 8;

// The character a one-letter escape writes, or -1 for a byte that is not one.
inline int32_t json_escape(uint8_t byte) {
  for (int i = 0; i < kJsonEscapeCount; ++i)
    if (uint8_t(kJsonEscapes[i]) == byte) return int32_t(kJsonEscaped[i]);
  return -1;
}

}  // namespace llamas
