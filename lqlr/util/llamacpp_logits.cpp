// lqlr-llama-logits: llama.cpp's logits (or tokenization) for lqlr's tests, linked against libllama.
// Built by `python -m lqlr.util.llamacpp build` (docs/gguf.md); not a general tool.
//
//   lqlr-llama-logits -m model.gguf [--lora lora.gguf] [--lora-scale S] [-t N] [--no-repack] [--kv f32|f16]
//                     -o logits.f32  < sequences
//       stdin: one sequence of token ids a line (whitespace-separated). Each sequence is decoded from position 0
//       in one batch (the memory cleared between sequences), with every position's logits output. The logits go
//       to -o as raw little-endian float32, (positions, n_vocab) row-major, sequences one after the other;
//       stdout gets one line "<positions> <n_vocab>".
//   lqlr-llama-logits -m model.gguf --dequantize -o weights.f32
//       every tensor of the file decoded to float32 by ggml's own row decoders (ggml_get_type_traits()->to_float),
//       one after the other in the file's order, to -o; stdout: one line "<name> <ne0> <ne1> <ne2> <ne3>" a tensor.
//   lqlr-llama-logits -m model.gguf [--lora lora.gguf] [-t N] [--kv f16] --decode N [--repeats R]  < prompt
//       decode speed: the prompt (one line of token ids) in one batch, then N tokens generated greedily (argmax),
//       one llama_decode each; R times (the memory cleared between), the fastest kept. stdout: one line
//       "<prompt tokens> <prompt seconds> <N> <decode seconds> <generated ids...>" (the ids of the fastest run).
//   lqlr-llama-logits -m model.gguf --tokenize [--no-special]  < text
//       stdout: llama.cpp's token ids of the whole of stdin (BOS/EOS as the model's add_bos/add_eos say,
//       unless --no-special; special tokens written in the text are parsed), space-separated on one line.
//
// Defaults chosen for a comparison, not for speed: K/V cache in F32 (llama.cpp's default is F16), flash
// attention off, the CPU weight repacking on (as llama-cli; --no-repack turns it off). Errors: one line on
// stderr (with llama.cpp's last error message), exit status 1.
#include "ggml.h"
#include "gguf.h"
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::string g_last_error;  // llama.cpp's last warning or error line, for the one-line failure message
bool g_verbose = false;

void log_cb(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN && level != GGML_LOG_LEVEL_CONT) {
        g_last_error = text;
        while (!g_last_error.empty() && (g_last_error.back() == '\n' || g_last_error.back() == ' ')) {
            g_last_error.pop_back();
        }
    }
    if (g_verbose) {
        fputs(text, stderr);
    }
}

[[noreturn]] void fail(const std::string & what) {
    std::string line = "lqlr-llama-logits: error: " + what;
    if (!g_last_error.empty()) {
        line += " (llama.cpp: " + g_last_error + ")";
    }
    for (char & c : line) {
        if (c == '\n' || c == '\r') c = ' ';
    }
    fprintf(stderr, "%s\n", line.c_str());
    exit(1);
}

std::string read_all(FILE * f) {
    std::string s;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) s.append(buf, n);
    return s;
}

struct Args {
    std::string model, lora, out;
    float lora_scale = 1.0f;
    int threads = 2, decode = 0, repeats = 1;
    bool repack = true, tokenize = false, special = true, dequantize = false;
    ggml_type kv = GGML_TYPE_F32;
};

Args parse(int argc, char ** argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        std::string k = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) fail("option " + k + " needs a value");
            return argv[++i];
        };
        if (k == "-m") a.model = value();
        else if (k == "--lora") a.lora = value();
        else if (k == "--lora-scale") a.lora_scale = std::stof(value());
        else if (k == "-t") a.threads = std::atoi(value().c_str());
        else if (k == "-o") a.out = value();
        else if (k == "--no-repack") a.repack = false;
        else if (k == "--decode") a.decode = std::atoi(value().c_str());
        else if (k == "--repeats") a.repeats = std::atoi(value().c_str());
        else if (k == "--tokenize") a.tokenize = true;
        else if (k == "--dequantize") a.dequantize = true;
        else if (k == "--no-special") a.special = false;
        else if (k == "--verbose") g_verbose = true;
        else if (k == "--kv") {
            std::string v = value();
            if (v == "f32") a.kv = GGML_TYPE_F32;
            else if (v == "f16") a.kv = GGML_TYPE_F16;
            else fail("--kv " + v + ": choose f32 or f16");
        } else fail("unknown option " + k + " (see the header of lqlr/util/llamacpp_logits.cpp)");
    }
    if (a.model.empty()) fail("-m MODEL is required");
    if (!a.tokenize && a.decode == 0 && a.out.empty()) fail("-o OUT is required (or --tokenize, --decode N)");
    if (a.decode < 0 || a.repeats < 1) fail("--decode must be at least 1 and --repeats at least 1");
    if (a.tokenize && a.dequantize) fail("--tokenize and --dequantize exclude each other");
    if (a.threads < 1) fail("-t must be at least 1");
    return a;
}

std::vector<std::vector<llama_token>> read_sequences(int n_vocab) {
    std::vector<std::vector<llama_token>> seqs;
    std::istringstream in(read_all(stdin));
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream ls(line);
        std::vector<llama_token> seq;
        long long id;
        while (ls >> id) {
            if (id < 0 || id >= n_vocab) fail("token id " + std::to_string(id) + " is outside the vocabulary of " +
                                              std::to_string(n_vocab));
            seq.push_back((llama_token) id);
        }
        if (!ls.eof()) fail("stdin line " + std::to_string(seqs.size() + 1) + " is not whitespace-separated token ids");
        if (!seq.empty()) seqs.push_back(seq);
    }
    if (seqs.empty()) fail("no token ids on stdin");
    return seqs;
}

// every tensor of a GGUF file through ggml's to_float, as llama.cpp's CPU backend decodes its blocks
int dequantize_all(const Args & a) {
    ggml_context * ctx = nullptr;
    gguf_init_params params = {false, &ctx};
    gguf_context * g = gguf_init_from_file(a.model.c_str(), params);
    if (!g || !ctx) fail("cannot read " + a.model + " as GGUF");
    FILE * out = fopen(a.out.c_str(), "wb");
    if (!out) fail("cannot write " + a.out);
    std::vector<float> buf;
    for (int64_t i = 0; i < gguf_get_n_tensors(g); ++i) {
        const char * name = gguf_get_tensor_name(g, i);
        ggml_tensor * t = ggml_get_tensor(ctx, name);
        if (!t) fail(std::string("tensor ") + name + " is not in the context");
        const int64_t n = ggml_nelements(t);
        buf.resize((size_t) n);
        if (t->type == GGML_TYPE_F32) {
            memcpy(buf.data(), t->data, (size_t) n * sizeof(float));
        } else {
            const ggml_type_traits * tr = ggml_get_type_traits(t->type);
            if (!tr->to_float) fail(std::string("ggml cannot decode ") + name + " (" + ggml_type_name(t->type) + ")");
            tr->to_float(t->data, buf.data(), n);
        }
        if (fwrite(buf.data(), sizeof(float), (size_t) n, out) != (size_t) n) fail("cannot write " + a.out);
        printf("%s %lld %lld %lld %lld\n", name, (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2],
               (long long) t->ne[3]);
    }
    if (fclose(out) != 0) fail("cannot write " + a.out);
    gguf_free(g);
    ggml_free(ctx);
    return 0;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// one sequence from position 0 as one batch: every position's logits out (all_logits), or the last one's
llama_batch sequence_batch(const std::vector<llama_token> & seq, bool all_logits) {
    llama_batch batch = llama_batch_init((int32_t) seq.size(), 0, 1);
    batch.n_tokens = (int32_t) seq.size();
    for (size_t i = 0; i < seq.size(); ++i) {
        batch.token[i] = seq[i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = all_logits || i + 1 == seq.size();
    }
    return batch;
}

// the prompt in one batch, then a.decode greedy tokens one llama_decode at a time; the fastest of a.repeats runs
int decode_speed(const Args & a, llama_context * ctx, const std::vector<llama_token> & prompt, int n_vocab) {
    double best_prompt = 1e30, best_decode = 1e30;
    std::vector<llama_token> best_ids;
    for (int r = 0; r < a.repeats; ++r) {
        llama_memory_clear(llama_get_memory(ctx), true);
        std::vector<llama_token> ids;
        llama_batch batch = sequence_batch(prompt, false);
        auto t0 = std::chrono::steady_clock::now();
        if (llama_decode(ctx, batch) != 0) fail("llama_decode of the prompt failed");
        const double prompt_s = seconds_since(t0);
        llama_batch_free(batch);
        t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < a.decode; ++i) {
            const float * row = llama_get_logits_ith(ctx, -1);
            if (!row) fail("no logits to pick the next token from");
            llama_token next = 0;
            for (int v = 1; v < n_vocab; ++v) if (row[v] > row[next]) next = v;
            ids.push_back(next);
            llama_batch one = llama_batch_get_one(&next, 1);  // positions follow the memory's; last logits out
            if (llama_decode(ctx, one) != 0) fail("llama_decode of generated token " + std::to_string(i) + " failed");
        }
        const double decode_s = seconds_since(t0);
        if (decode_s < best_decode) {
            best_decode = decode_s;
            best_ids = ids;
        }
        best_prompt = prompt_s < best_prompt ? prompt_s : best_prompt;
    }
    printf("%zu %.9f %d %.9f", prompt.size(), best_prompt, a.decode, best_decode);
    for (llama_token t : best_ids) printf(" %d", t);
    printf("\n");
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    Args a = parse(argc, argv);
    llama_log_set(log_cb, nullptr);
    if (a.dequantize) return dequantize_all(a);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.use_extra_bufts = a.repack;
    mp.vocab_only = a.tokenize;
    llama_model * model = llama_model_load_from_file(a.model.c_str(), mp);
    if (!model) fail("cannot load " + a.model);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    if (a.tokenize) {
        std::string text = read_all(stdin);
        std::vector<llama_token> ids(text.size() + 8);
        int n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(), a.special,
                               true);  // special tokens in the text are parsed, as transformers' encode does
        if (n < 0) fail("llama_tokenize failed");
        for (int i = 0; i < n; ++i) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        llama_model_free(model);
        return 0;
    }

    std::vector<std::vector<llama_token>> seqs = read_sequences(n_vocab);
    size_t longest = 0;
    for (auto & s : seqs) longest = s.size() > longest ? s.size() : longest;
    if (a.decode > 0 && seqs.size() != 1) fail("--decode takes one prompt: one line of token ids on stdin");

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (longest + a.decode);
    cp.n_batch = cp.n_ubatch = (uint32_t) longest;  // one sequence = one batch = one graph
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = a.threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = cp.type_v = a.kv;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) fail("cannot create a context of " + std::to_string(longest) + " positions");

    if (!a.lora.empty()) {
        llama_adapter_lora * adapter = llama_adapter_lora_init(model, a.lora.c_str());
        if (!adapter) fail("cannot load the LoRA adapter " + a.lora);
        float scale = a.lora_scale;
        if (llama_set_adapters_lora(ctx, &adapter, 1, &scale) != 0) fail("cannot apply the LoRA adapter " + a.lora);
    }

    if (a.decode > 0) {
        decode_speed(a, ctx, seqs[0], n_vocab);
        llama_free(ctx);
        llama_model_free(model);
        llama_backend_free();
        return 0;
    }

    FILE * out = fopen(a.out.c_str(), "wb");
    if (!out) fail("cannot write " + a.out);
    size_t positions = 0;
    for (auto & seq : seqs) {
        llama_memory_clear(llama_get_memory(ctx), true);
        llama_batch batch = sequence_batch(seq, true);
        int rc = llama_decode(ctx, batch);
        if (rc != 0) fail("llama_decode returned " + std::to_string(rc));
        for (size_t i = 0; i < seq.size(); ++i) {
            const float * row = llama_get_logits_ith(ctx, (int32_t) i);
            if (!row) fail("no logits for position " + std::to_string(i));
            if (fwrite(row, sizeof(float), (size_t) n_vocab, out) != (size_t) n_vocab) fail("cannot write " + a.out);
        }
        positions += seq.size();
        llama_batch_free(batch);
    }
    if (fclose(out) != 0) fail("cannot write " + a.out);
    printf("%zu %d\n", positions, n_vocab);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
