// Grammars in structured output (GBNF, compiled by llamas/grammar.py): a reading is a stack of
// kGram frames, one per rule alternative under way, each at its next element; the top one's next
// element is always a character set. A rule met at the top is replaced by its alternatives, one
// reading each (as llama.cpp's grammar stacks); a frame whose alternative is done is popped, and
// one whose last element is the rule being entered is popped first (a tail call), so that the
// right recursion `x*` compiles to keeps the stack flat. The compiler refuses left recursion and
// rules that derive no text, so expanding always ends, at a character set or with the whole
// grammar matched (an empty stack).
#include "runtime/json_schema_internal.h"

namespace llamas {

using namespace schema_detail;
using Kind = SchemaNode::Kind;

namespace {
// Readings one expansion may produce before the rest are dropped (nullable rules nested inside
// each other multiply them; advance() keeps kMaxThreads of what is left).
constexpr size_t kExpandCap = 64;
}  // namespace

void SchemaState::expand(SchemaThread t, std::vector<SchemaThread>& out) const {
  while (true) {
    if (out.size() >= kExpandCap) return;
    if (t.depth == 0) {  // the grammar is matched
      out.push_back(t);
      return;
    }
    SchemaFrame& f = t.frames[t.depth - 1];
    const SchemaNode& seq = schema_->nodes[f.node];
    if (f.a == seq.children.size()) {
      --t.depth;
      continue;
    }
    const int32_t next = seq.children[f.a];
    const SchemaNode& element = schema_->nodes[size_t(next)];
    if (element.kind == Kind::kCharSet) {
      out.push_back(t);
      return;
    }
    if (++f.a == seq.children.size()) --t.depth;  // nothing of this alternative is left after the rule
    for (int32_t alt : element.children) {
      SchemaThread fork = t;
      if (!push(fork, alt)) continue;  // deeper than kMaxDepth: this way is given up
      fork.frames[fork.depth - 1].mode = kGram;
      expand(fork, out);
    }
    return;
  }
}

bool SchemaState::grammar_byte(SchemaThread& t, uint8_t byte, std::vector<SchemaThread>& out) const {
  SchemaFrame& f = t.frames[t.depth - 1];
  const SchemaNode& charset = schema_->nodes[size_t(schema_->nodes[f.node].children[f.a])];
  if (!raw_byte(*schema_, charset, f, byte)) return false;
  if (f.aux > 0) return true;  // a character under way
  f.b = 0, ++f.a;              // the set took a whole character: on to what follows it
  expand(t, out);
  return false;
}

void SchemaState::start_grammar() {
  for (int32_t alt : schema_->nodes[size_t(schema_->root)].children) {
    SchemaThread t;
    if (!push(t, alt)) continue;
    t.frames[0].mode = kGram;
    expand(t, threads_);
  }
  keep_distinct(threads_);
}

}  // namespace llamas
