// The consistency checks of a compiled schema (json_schema.h): a table built from Python must not
// be able to make the recogniser read past its vectors, whatever it holds.
#include <algorithm>

#include "llamas/error.h"
#include "runtime/json_schema.h"

namespace llamas {

using Kind = SchemaNode::Kind;

void JsonSchema::validate() const {
  const int64_t n = int64_t(nodes.size());
  LLAMAS_CHECK(n > 0 && n < 65536, "json_schema", "a schema needs 1 to 65535 nodes, got ", n);
  for (const SchemaDfa& d : dfas) d.validate();
  LLAMAS_CHECK(root >= 0 && root < n, "json_schema", "root ", root, " is not a node");
  LLAMAS_CHECK(nodes[size_t(root)].min_depth <= SchemaThread::kMaxDepth, "json_schema", "the root needs ",
               nodes[size_t(root)].min_depth, " levels of nesting; at most ", SchemaThread::kMaxDepth);
  for (int64_t i = 0; i < n; ++i) {
    const SchemaNode& s = nodes[size_t(i)];
    for (int32_t c : s.children) {
      LLAMAS_CHECK(c >= 0 && c < n, "json_schema", "node ", i, " has child ", c, ", not a node");
      LLAMAS_CHECK(s.kind != Kind::kAnyOf || nodes[size_t(c)].kind != Kind::kAnyOf, "json_schema", "anyOf node ", i,
                   " has an anyOf alternative (flatten them)");
    }
    LLAMAS_CHECK(s.min_count >= 0 && s.min_count <= s.max_count, "json_schema", "node ", i, " has counts ",
                 s.min_count, "..", s.max_count);
    LLAMAS_CHECK(s.min_depth >= 1, "json_schema", "node ", i, " has min_depth ", s.min_depth);
    LLAMAS_CHECK(s.dfa < int64_t(dfas.size()) &&
                     (s.dfa < 0 || s.kind == Kind::kString || s.kind == Kind::kRegex || s.kind == Kind::kCharSet),
                 "json_schema", "node ", i, " has DFA ", s.dfa, " (", dfas.size(),
                 " DFAs; strings, regex and character sets only)");
    switch (s.kind) {
      case Kind::kAnyOf:
        LLAMAS_CHECK(!s.children.empty(), "json_schema", "anyOf node ", i, " has no alternatives");
        break;
      case Kind::kEnum:
        LLAMAS_CHECK(!s.literals.empty() && s.literals.size() < 65536, "json_schema", "enum node ", i,
                     " needs 1 to 65535 values");
        LLAMAS_CHECK(std::is_sorted(s.literals.begin(), s.literals.end()), "json_schema", "enum node ", i,
                     " values are not sorted");
        for (const std::string& l : s.literals)
          LLAMAS_CHECK(!l.empty(), "json_schema", "enum node ", i, " has an empty value");
        break;
      case Kind::kObject:
        LLAMAS_CHECK(s.literals.size() <= 64 && s.children.size() == s.literals.size() &&
                         s.required.size() == s.literals.size(),
                     "json_schema", "object node ", i, " needs one name, child and required flag per property (<= 64)");
        break;
      case Kind::kMap:
        LLAMAS_CHECK(s.children.size() == 2 && nodes[size_t(s.children[1])].kind == Kind::kString, "json_schema",
                     "map node ", i, " needs [value node, key string node]");
        break;
      case Kind::kArray:
        LLAMAS_CHECK(s.children.size() == 1, "json_schema", "array node ", i, " needs one items node");
        break;
      case Kind::kRegex:
        LLAMAS_CHECK(i == root && s.dfa >= 0, "json_schema", "regex node ", i, " must be the root and have a DFA");
        break;
      case Kind::kRule:
        for (int32_t c : s.children)
          LLAMAS_CHECK(nodes[size_t(c)].kind == Kind::kSequence, "json_schema", "rule node ", i,
                       " has an alternative that is not a sequence");
        break;
      case Kind::kSequence:
        for (int32_t c : s.children)
          LLAMAS_CHECK(nodes[size_t(c)].kind == Kind::kRule || nodes[size_t(c)].kind == Kind::kCharSet, "json_schema",
                       "sequence node ", i, " has an element that is neither a rule nor a character set");
        break;
      case Kind::kCharSet:
        LLAMAS_CHECK(s.dfa >= 0, "json_schema", "character set node ", i, " has no DFA");
        break;
      default:
        break;
    }
  }
}

void SchemaDfa::validate() const {
  const int32_t n = states();
  LLAMAS_CHECK(n >= 1 && n < (1 << 24), "json_schema", "a DFA needs 1 to 2^24 - 1 states, got ", n);
  LLAMAS_CHECK(first.size() == size_t(n) + 1 && dist.size() == size_t(n) && first[0] == 0 &&
                   first[size_t(n)] == edges.size(),
               "json_schema", "a DFA's tables disagree on its size");
  for (int32_t st = 0; st < n; ++st) {
    LLAMAS_CHECK(first[size_t(st)] <= first[size_t(st) + 1], "json_schema", "a DFA's edge offsets go backwards");
    LLAMAS_CHECK(dist[size_t(st)] >= 0 && (dist[size_t(st)] == 0) == bool(accepting[size_t(st)]), "json_schema",
                 "DFA state ", st, " has distance ", dist[size_t(st)], " to a match");
    for (uint32_t e = first[size_t(st)]; e < first[size_t(st) + 1]; ++e) {
      const Edge& x = edges[e];
      LLAMAS_CHECK(x.lo <= x.hi && x.hi <= 0x10FFFF && x.next >= 0 && x.next < n, "json_schema", "DFA state ", st,
                   " has an edge out of range");
      LLAMAS_CHECK(e == first[size_t(st)] || edges[e - 1].hi < x.lo, "json_schema", "DFA state ", st,
                   " has edges out of order or overlapping");
    }
  }
}

}  // namespace llamas
