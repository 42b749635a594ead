// llamas._C.GPT2Model and llamas._C.Sequence.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <tuple>

#include "llamas/error.h"
#include "models/gpt2.h"
#include "python/convert.h"
#include "python/gil.h"
#include "runtime/token_constraints.h"

namespace llamas {
namespace python {

// Seconds the last `step` called from this thread ran with the GIL released: the engine thread
// subtracts it from the call's wall time to see how long getting the GIL back took.
thread_local double t_last_step_seconds = 0;

GPT2Config config_from_dict(const py::dict& d) {
  GPT2Config c;
  auto get_int = [&](const char* key, int64_t& field) {
    if (!d.contains(key) || d[key].is_none()) return;
    py::object v = d[key];
    if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v))
      fail("gpt2_config", "'", key, "' must be an integer, got ", std::string(py::str(v)));
    field = v.cast<int64_t>();
  };
  get_int("vocab_size", c.vocab_size);
  get_int("n_positions", c.n_positions);
  get_int("n_embd", c.n_embd);
  get_int("n_layer", c.n_layer);
  get_int("n_head", c.n_head);
  get_int("n_inner", c.n_inner);
  if (d.contains("layer_norm_epsilon") && !d["layer_norm_epsilon"].is_none()) {
    py::object v = d["layer_norm_epsilon"];
    if (!(py::isinstance<py::float_>(v) || py::isinstance<py::int_>(v)) || py::isinstance<py::bool_>(v))
      fail("gpt2_config", "'layer_norm_epsilon' must be a number, got ", std::string(py::str(v)));
    c.layer_norm_epsilon = v.cast<float>();
  }
  auto get_bool = [&](const char* key, bool& field) {
    if (!d.contains(key) || d[key].is_none()) return;
    py::object v = d[key];
    if (!py::isinstance<py::bool_>(v)) fail("gpt2_config", "'", key, "' must be true or false, got ", std::string(py::str(v)));
    field = v.cast<bool>();
  };
  get_bool("scale_attn_weights", c.scale_attn_weights);
  get_bool("scale_attn_by_inverse_layer_idx", c.scale_attn_by_inverse_layer_idx);
  c.validate();
  return c;
}

void init_model(py::module_& m) {
  py::class_<TokenBytes, std::shared_ptr<TokenBytes>>(
      m, "TokenBytes", "Each token's bytes (empty for special tokens) and end-of-text: what structured output masks.")
      .def(py::init([](const std::vector<py::bytes>& bytes, int32_t eos) {
             return std::make_shared<TokenBytes>(std::vector<std::string>(bytes.begin(), bytes.end()), eos);
           }),
           py::arg("bytes"), py::arg("eos") = -1)
      .def("__len__", [](const TokenBytes& t) { return t.bytes.size(); });
  m.def("last_step_seconds", [] { return t_last_step_seconds; },
        "Seconds the last Model.step called from this thread ran without the GIL (its forward alone).");
  m.def("json_prefix", [](const py::bytes& text) {
        JsonState state;
        const bool ok = state.feed(std::string(text));
        return py::make_tuple(ok, ok && state.complete());
      }, py::arg("text"),
      "(valid, complete): whether JSON mode could have produced these bytes, and whether they close the "
      "object (the recogniser behind response_format json_object; for tests).");
  py::class_<JsonSchema, std::shared_ptr<JsonSchema>>(
      m, "JsonSchema", "A JSON Schema compiled to the node table structured output follows (see llamas.json_schema).")
      .def(py::init<>())
      .def("add_node",
           [](JsonSchema& s, const std::string& kind, const std::vector<int32_t>& children,
              const std::vector<py::bytes>& literals, const std::vector<bool>& required, int64_t min_count,
              int64_t max_count, const py::object& lo, const py::object& hi, bool lo_exclusive,
              bool hi_exclusive, int32_t min_depth, int32_t dfa) {
             static const std::map<std::string, SchemaNode::Kind> kinds = {
                 {"anyOf", SchemaNode::Kind::kAnyOf},     {"enum", SchemaNode::Kind::kEnum},
                 {"string", SchemaNode::Kind::kString},   {"integer", SchemaNode::Kind::kInteger},
                 {"number", SchemaNode::Kind::kNumber},   {"object", SchemaNode::Kind::kObject},
                 {"map", SchemaNode::Kind::kMap},         {"array", SchemaNode::Kind::kArray},
                 {"regex", SchemaNode::Kind::kRegex},     {"rule", SchemaNode::Kind::kRule},
                 {"sequence", SchemaNode::Kind::kSequence}, {"charset", SchemaNode::Kind::kCharSet}};
             auto k = kinds.find(kind);
             LLAMAS_CHECK(k != kinds.end(), "json_schema", "unknown node kind '", kind, "'");
             SchemaNode n;
             n.kind = k->second, n.children = children;
             n.literals.assign(literals.begin(), literals.end());
             n.required.assign(required.begin(), required.end());
             n.min_count = min_count, n.max_count = max_count;
             // A bound given as an int, or as a decimal (m, e) meaning m 10^e, is kept exactly; a
             // float as its double. (Ints past 10^18 change nothing: no 18-digit number is closer.)
             // A bound is None, an int, or a decimal (m, e) meaning m 10^e (llamas/schema_compiler.py
             // writes a float bound so, as its shortest decimal: 0.1 is 1e-1, not the double nearest
             // it). Ints past 10^18 change nothing: no 18-digit number is closer.
             auto bound = [](const py::object& b, bool& has, int64_t& m, int32_t& e) {
               has = !b.is_none();
               if (!has) return;
               const bool is_int = py::isinstance<py::int_>(b) && !py::isinstance<py::bool_>(b);
               LLAMAS_CHECK(is_int || (py::isinstance<py::tuple>(b) && py::len(b) == 2), "json_schema",
                            "a bound must be an int or a decimal (m, e)");
               py::object digits = is_int ? b : b.cast<py::tuple>()[0];
               const py::int_ limit(int64_t(1000000000000000000));
               const bool past = digits.attr("__gt__")(limit).cast<bool>() || digits.attr("__lt__")(-limit).cast<bool>();
               LLAMAS_CHECK(!past || is_int, "json_schema", "a decimal bound's digits must be within 10^18");
               if (past) digits = digits.attr("__gt__")(py::int_(0)).cast<bool>() ? limit : py::int_(-limit);
               m = digits.cast<int64_t>(), e = is_int ? 0 : b.cast<py::tuple>()[1].cast<int32_t>();
               LLAMAS_CHECK(e > -100000 && e < 100000, "json_schema", "a decimal bound's exponent is out of range");
             };
             bound(lo, n.has_lo, n.lo_m, n.lo_e);
             bound(hi, n.has_hi, n.hi_m, n.hi_e);
             n.lo_exclusive = lo_exclusive, n.hi_exclusive = hi_exclusive;
             prepare_bounds(n);
             n.min_depth = min_depth, n.dfa = dfa;
             s.nodes.push_back(std::move(n));
             return int64_t(s.nodes.size()) - 1;
           },
           py::arg("kind"), py::arg("children") = std::vector<int32_t>(),
           py::arg("literals") = std::vector<py::bytes>(), py::arg("required") = std::vector<bool>(),
           py::arg("min_count") = 0, py::arg("max_count") = INT64_MAX, py::arg("lo") = py::none(),
           py::arg("hi") = py::none(), py::arg("lo_exclusive") = false, py::arg("hi_exclusive") = false,
           py::arg("min_depth") = 1, py::arg("dfa") = -1,
           "Appends a node; returns its index.")
      .def("add_dfa",
           [](JsonSchema& s, const std::vector<bool>& accepting,
              const std::vector<std::vector<std::tuple<uint32_t, uint32_t, int32_t>>>& edges,
              const std::vector<int32_t>& dist) {
             LLAMAS_CHECK(edges.size() == accepting.size(), "json_schema", "a DFA needs one edge list per state");
             SchemaDfa d;
             d.accepting.assign(accepting.begin(), accepting.end());
             d.dist = dist;
             d.first.push_back(0);
             for (const auto& out : edges) {
               for (const auto& [lo, hi, next] : out) d.edges.push_back({lo, hi, next});
               d.first.push_back(uint32_t(d.edges.size()));
             }
             s.dfas.push_back(std::move(d));
             return int64_t(s.dfas.size()) - 1;
           },
           py::arg("accepting"), py::arg("edges"), py::arg("dist"),
           "Appends a DFA over code points (state 0 starts; edges [(lo, hi, next)] sorted per state); returns its "
           "index.")
      .def_readwrite("root", &JsonSchema::root)
      .def_readwrite("compact", &JsonSchema::compact, "No whitespace between JSON tokens.")
      .def("__len__", [](const JsonSchema& s) { return s.nodes.size(); })
      .def("validate", &JsonSchema::validate, "Raises when an index, count or kind is inconsistent.")
      .def("match", [](const std::shared_ptr<JsonSchema>& s, const py::bytes& text) {
             SchemaState state(s);
             const bool ok = state.feed(std::string(text));
             return py::make_tuple(ok, ok && state.complete());
           }, py::arg("text"),
           "(valid, complete): whether structured output could have produced these bytes, and whether "
           "they are a whole instance (for tests).");
  py::class_<Sequence>(m, "Sequence", "One sequence being generated: KV cache, tokens so far, sampler.")
      .def(py::init([](const py::dict& config, float temperature, int top_k, float top_p, float min_p,
                       float repetition_penalty, float presence_penalty, float frequency_penalty, uint64_t seed,
                       const std::map<int32_t, float>& logit_bias, int logprobs, int min_tokens,
                       const std::vector<int32_t>& min_tokens_banned, std::shared_ptr<TokenBytes> constraint_vocab,
                       bool json_object, const std::vector<py::bytes>& choices,
                       std::shared_ptr<JsonSchema> json_schema) {
             SamplingParams p;
             p.temperature = temperature, p.top_k = top_k, p.top_p = top_p, p.min_p = min_p;
             p.repetition_penalty = repetition_penalty;
             p.presence_penalty = presence_penalty, p.frequency_penalty = frequency_penalty;
             p.logit_bias.assign(logit_bias.begin(), logit_bias.end());
             p.logprobs = logprobs;
             p.min_tokens = min_tokens;
             p.min_tokens_banned = min_tokens_banned;
             GPT2Config c = config_from_dict(config);
             for (int32_t token : p.min_tokens_banned)
               LLAMAS_CHECK(token < c.vocab_size, "sampling", "stop token ", token, " is outside the vocabulary [0, ",
                            c.vocab_size, ")");
             for (auto& [token, bias] : p.logit_bias)
               LLAMAS_CHECK(token < c.vocab_size, "sampling", "logit_bias token ", token, " is outside the vocabulary [0, ",
                            c.vocab_size, ")");
             LLAMAS_CHECK(int(json_object) + int(!choices.empty()) + int(bool(json_schema)) <= 1, "sampling",
                          "json_object, choices and json_schema cannot be combined");
             LLAMAS_CHECK(constraint_vocab || (!json_object && choices.empty() && !json_schema), "sampling",
                          "json_object, choices and json_schema need constraint_vocab (the tokenizer's token bytes)");
             auto* seq = new Sequence(c, p, seed);
             if (json_object) seq->sampler.constraint = std::make_unique<JsonConstraint>(constraint_vocab);
             if (!choices.empty())
               seq->sampler.constraint = std::make_unique<ChoiceConstraint>(
                   constraint_vocab, std::vector<std::string>(choices.begin(), choices.end()));
             if (json_schema) seq->sampler.constraint = std::make_unique<SchemaConstraint>(constraint_vocab, json_schema);
             return seq;
           }),
           py::arg("config"), py::arg("temperature") = 0.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
           py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f, py::arg("presence_penalty") = 0.0f,
           py::arg("frequency_penalty") = 0.0f, py::arg("seed") = 0,
           py::arg("logit_bias") = std::map<int32_t, float>(), py::arg("logprobs") = -1, py::arg("min_tokens") = 0,
           py::arg("min_tokens_banned") = std::vector<int32_t>(), py::arg("constraint_vocab") = nullptr,
           py::arg("json_object") = false, py::arg("choices") = std::vector<py::bytes>(),
           py::arg("json_schema") = nullptr)
      .def_property_readonly("last_logprob", [](const Sequence& s) { return s.sampler.last_logprob; },
                             "Log-probability of the last sampled token (when logprobs >= 0).")
      .def_property_readonly("last_top_logprobs", [](const Sequence& s) { return s.sampler.last_top_logprobs; },
                             "[(token id, log-probability)] of the most likely tokens at the last step.")
      .def_property_readonly("scores", [](const Sequence& s) {
             py::list out;
             for (const TokenScore& t : s.scores) out.append(py::make_tuple(t.token, t.logprob, t.top));
             return out;
           }, "[(token id, log-probability, [(id, log-probability)] top)] of the last step's targets.")
      .def_property_readonly("verified", [](const Sequence& s) { return s.verified; },
                             "The accepted drafts and the token after them, from the last step that verified drafts "
                             "for this sequence.")
      .def("verify_logits", [](Sequence& s, FloatArray logits, const std::vector<int32_t>& drafts,
                                const std::vector<int32_t>& context) {
             LLAMAS_CHECK(logits.ndim() == 2 && logits.shape(0) == py::ssize_t(drafts.size()) + 1, "sample",
                          "verify_logits needs (len(drafts) + 1, vocab) logits");
             std::vector<float> rows(logits.data(), logits.data() + logits.size());
             return s.sampler.verify(rows.data(), logits.shape(1), drafts, context, 0);
           }, py::arg("logits"), py::arg("drafts"), py::arg("context"),
           "For tests: this sequence's sampler verifying drafts against given logits rows (row r follows the "
           "context without its last len(drafts) - r tokens; the context ends with the drafts).")
      .def("sample_logits", [](Sequence& s, FloatArray logits, const std::vector<int32_t>& context) {
             LLAMAS_CHECK(logits.ndim() == 1, "sample", "sample_logits needs one row of logits");
             std::vector<float> row(logits.data(), logits.data() + logits.size());
             return s.sampler.sample(row.data(), logits.shape(0), context, 0);
           }, py::arg("logits"), py::arg("context"),
           "For tests: this sequence's sampler drawing from given logits after the context.")
      .def("truncate", &Sequence::truncate, py::arg("n"),
           "Keeps the first n tokens (and their KV positions): drops rejected speculative drafts.")
      .def_property_readonly("length", [](const Sequence& s) { return s.cache.length(); })
      .def_property_readonly("kv_blocks", [](const Sequence& s) { return s.cache.blocks(); })
      .def_property_readonly("kv_bytes", [](const Sequence& s) { return s.cache.blocks() * s.cache.bytes_per_block(); })
      .def_property_readonly("tokens", [](const Sequence& s) { return s.tokens; })
      .def("release", [](Sequence& s) { s.cache.clear(); }, "Frees the KV cache now.")
      .def("share_blocks", [](const Sequence& s, int64_t first, int64_t count) {
             LLAMAS_CHECK(first >= 0 && count >= 0, "kv_cache", "share_blocks needs first >= 0 and count >= 0");
             std::vector<std::unique_ptr<KvBlockRef>> out;
             for (int64_t i = first; i < first + count; ++i) out.push_back(std::make_unique<KvBlockRef>(s.cache, i));
             return out;
           }, py::arg("first"), py::arg("count"),
           "References to full KV blocks [first, first + count) (each holds its block until dropped).")
      .def("adopt", [](Sequence& s, const std::vector<KvBlockRef*>& blocks, const std::vector<int32_t>& tokens) {
             LLAMAS_CHECK(s.tokens.empty() && s.cache.length() == 0, "kv_cache",
                          "only a sequence that has been fed nothing can adopt shared blocks");
             LLAMAS_CHECK(tokens.size() == blocks.size() * size_t(kKvBlockSize), "kv_cache", "adopting ", blocks.size(),
                          " blocks needs their ", blocks.size() * kKvBlockSize, " tokens, got ", tokens.size());
             std::vector<void*> handles;
             for (const KvBlockRef* b : blocks) {
               LLAMAS_CHECK(b != nullptr, "kv_cache", "a shared block is None");
               LLAMAS_CHECK(b->fits(s.cache), "kv_cache", "a shared block comes from a model of another shape");
               LLAMAS_CHECK(b->dtype() == blocks[0]->dtype(), "kv_cache", "shared blocks of mixed dtypes");
               handles.push_back(b->block());
             }
             if (!handles.empty()) s.cache.adopt(handles, blocks[0]->dtype());
             s.tokens = tokens;
           }, py::arg("blocks"), py::arg("tokens"),
           "Starts this fresh sequence from shared full KV blocks holding `tokens` (16 per block).");

  py::class_<KvBlockRef>(m, "KvBlock", "A reference to a full block of a sequence's KV cache (see Sequence.share_blocks).")
      .def_property_readonly("nbytes", &KvBlockRef::bytes)
      .def_property_readonly("dtype", [](const KvBlockRef& b) { return std::string(dtype_name(b.dtype())); });

  py::class_<GPT2Model>(m, "GPT2Model")
      .def(py::init([](const py::dict& config, const std::vector<std::string>& weight_files, const std::string& dtype) {
             GPT2Config c = config_from_dict(config);
             DType dt = parse_dtype(dtype, "load", "dtype", true);
             llamas_python::ReleaseGil release;
             return new GPT2Model(c, load_gpt2_weights(weight_files, c, dt));
           }),
           py::arg("config"), py::arg("weight_files"), py::arg("dtype") = "float32",
           "weight_files: [model.safetensors], or the shards of a sharded checkpoint.")
      .def_property_readonly("weight_bytes", [](const GPT2Model& m) { return m.weights().bytes(); })
      .def_property_readonly("weights_streamed", [](const GPT2Model& m) {
        return m.weights().packed() && m.weights().lm_head_p.streamed;
      })
      .def_property_readonly("dtype", [](const GPT2Model& m) { return std::string(dtype_name(m.dtype())); })
      .def_property_readonly("kv_block_bytes", [](const GPT2Model& m) {
        const GPT2Config& c = m.config();
        return 2 * c.n_layer * kv_region_bytes(int64_t(dtype_size(m.kv_dtype())), c.n_head, c.n_embd / c.n_head);
      }, "Bytes of one KV-cache block (16 positions, every layer's keys and values) in the current kv_dtype.")
      .def_property("kv_dtype", [](const GPT2Model& m) { return std::string(dtype_name(m.kv_dtype())); },
                    [](GPT2Model& m, const std::string& name) { m.set_kv_dtype(parse_dtype(name, "load", "kv_dtype", true)); },
                    "Entry type of the KV caches it fills: 'float32', 'bfloat16' or 'int8' (default: the weights' "
                    "dtype; bfloat16 for int8 weights).")
      .def_property("compute_dtype", [](const GPT2Model& m) { return std::string(dtype_name(m.compute_dtype())); },
                    [](GPT2Model& m, const std::string& name) {
                      m.set_compute_dtype(parse_dtype(name, "load", "compute_dtype", true));
                    },
                    "The dtype of the GEMMs' activations: 'float32' (default), 'bfloat16' (bfloat16 or int8 weights) "
                    "or 'int8' (int8 weights).")
      .def("forward", [](GPT2Model& model, IntArray ids) {
        LLAMAS_CHECK(ids.ndim() == 2, "forward", "ids must be a 2-D (B, T) integer array, got ", ids.ndim(), " dims");
        Tensor out;
        {
          llamas_python::ReleaseGil release;
          out = model.forward(ids.data(), ids.shape(0), ids.shape(1));
        }
        return to_numpy(out);
      }, py::arg("ids"))
      .def("step", [](GPT2Model& model, const py::list& entries) {
        std::vector<StepEntry> steps;
        std::vector<py::object> keep;  // sequences stay alive while the GIL is released
        for (py::handle h : entries) {
          py::tuple t = py::reinterpret_borrow<py::tuple>(h);
          LLAMAS_CHECK(t.size() == 3 || t.size() == 4 || t.size() == 5, "step",
                       "each entry is (sequence, token ids, sample), (sequence, token ids, sample, verify_drafts) or "
                       "(sequence, token ids, sample, targets, top)");
          StepEntry e;
          keep.push_back(py::reinterpret_borrow<py::object>(t[0]));
          e.seq = t[0].cast<Sequence*>();
          e.tokens = t[1].cast<std::vector<int32_t>>();
          e.sample = t[2].cast<bool>();
          if (t.size() == 4) e.verify_drafts = t[3].cast<bool>();
          if (t.size() == 5) {
            e.targets = t[3].cast<std::vector<int32_t>>();
            e.score_top = t[4].cast<int>();
            LLAMAS_CHECK(!e.targets.empty(), "step", "an entry's targets must hold one per token (-1 for none)");
          }
          steps.push_back(std::move(e));
        }
        std::vector<int32_t> sampled;
        {
          llamas_python::ReleaseGil release;
          const auto start = std::chrono::steady_clock::now();
          sampled = model.step(steps);
          t_last_step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        }
        return sampled;
      }, py::arg("entries"),
      "Feeds each (sequence, ids, sample) entry in one batched forward; returns the sampled ids (-1 if not sampled).\n"
      "An entry (sequence, ids, sample, targets, top) also scores targets[i] (-1: none) as the token after ids[i],\n"
      "into the sequence's `scores`; (sequence, ids, True, True) verifies ids[1:] as speculative drafts into its\n"
      "`verified` (accepted drafts, then the token after them; the step returns the last).");
}

}  // namespace python
}  // namespace llamas
