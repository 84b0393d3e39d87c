// torchship-run: run a torchship bundle without Python.
//
//   torchship-run BUNDLE_DIR INPUTS.safetensors OUTPUTS.safetensors [--repeat N]
//
// Reads the bundle's manifest.json, loads its AOTInductor package (runtime "aoti", through LibTorch's
// AOTIModelPackageLoader), its TorchScript file (runtime "torchscript") or its OpenVINO IR (runtime "openvino",
// where it was built with OpenVINO), feeds it the tensors named by the
// manifest's inputs from INPUTS.safetensors, and writes the outputs, named as in the manifest, to
// OUTPUTS.safetensors. Nothing is unpickled: the inputs and outputs are safetensors, the model a .pt2 package
// (or a TorchScript archive).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/torch.h>
#ifdef TORCHSHIP_WITH_OPENVINO
#include <openvino/openvino.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// ---- a small JSON reader: enough for manifest.json and safetensors headers ----
struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool boolean = false;
  double number = 0;
  std::string text;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;

  const Json* find(const std::string& key) const {
    for (const auto& [k, v] : fields)
      if (k == key) return &v;
    return nullptr;
  }
  const Json& at(const std::string& key) const {
    const Json* v = find(key);
    if (!v) throw std::runtime_error("missing key \"" + key + "\"");
    return *v;
  }
};

class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}
  Json parse() {
    Json v = value();
    space();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("bad JSON at byte " + std::to_string(i_) + ": " + why);
  }
  void space() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool eat(char c) {
    space();
    if (i_ < s_.size() && s_[i_] == c) return ++i_, true;
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }
  std::string string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unfinished escape");
      char e = s_[i_++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          if (i_ + 4 > s_.size()) fail("short \\u escape");
          unsigned code = std::stoul(s_.substr(i_, 4), nullptr, 16);
          i_ += 4;
          out += code < 0x80 ? static_cast<char>(code) : '?';  // names and paths here are ASCII
          break;
        }
        default: out += e;
      }
    }
    expect('"');
    return out;
  }
  Json value() {
    space();
    if (i_ >= s_.size()) fail("unexpected end");
    Json v;
    char c = s_[i_];
    if (c == '{') {
      ++i_;
      v.kind = Json::Object;
      if (eat('}')) return v;
      do {
        space();
        std::string key = string();
        expect(':');
        v.fields.emplace_back(key, value());
      } while (eat(','));
      expect('}');
    } else if (c == '[') {
      ++i_;
      v.kind = Json::Array;
      if (eat(']')) return v;
      do v.items.push_back(value());
      while (eat(','));
      expect(']');
    } else if (c == '"') {
      v.kind = Json::String;
      v.text = string();
    } else if (s_.compare(i_, 4, "true") == 0 || s_.compare(i_, 5, "false") == 0) {
      v.kind = Json::Bool;
      v.boolean = s_[i_] == 't';
      i_ += v.boolean ? 4 : 5;
    } else if (s_.compare(i_, 4, "null") == 0) {
      i_ += 4;
    } else {
      size_t used = 0;
      v.kind = Json::Number;
      v.number = std::stod(s_.substr(i_, 64), &used);
      if (!used) fail("unexpected character");
      i_ += used;
    }
    return v;
  }
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  std::ostringstream out;
  out << f.rdbuf();
  return out.str();
}

// ---- safetensors ----
const std::map<std::string, torch::Dtype>& dtypes() {
  static const std::map<std::string, torch::Dtype> table = {
      {"F64", torch::kFloat64}, {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16},
      {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},   {"I8", torch::kInt8},
      {"U8", torch::kUInt8},    {"BOOL", torch::kBool}};
  return table;
}

std::map<std::string, torch::Tensor> read_safetensors(const std::string& path) {
  std::string bytes = read_file(path);
  if (bytes.size() < 8) throw std::runtime_error(path + " is not a safetensors file (too short)");
  uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<unsigned char>(bytes[k]);
  if (8 + n > bytes.size()) throw std::runtime_error(path + " is not a safetensors file (bad header length)");
  Json header = Parser(bytes.substr(8, n)).parse();
  const char* data = bytes.data() + 8 + n;
  size_t available = bytes.size() - 8 - n;
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, info] : header.fields) {
    if (name == "__metadata__") continue;
    auto dt = dtypes().find(info.at("dtype").text);
    if (dt == dtypes().end()) throw std::runtime_error(path + ": tensor " + name + " has unsupported dtype " + info.at("dtype").text);
    std::vector<int64_t> shape;
    for (const auto& d : info.at("shape").items) shape.push_back(static_cast<int64_t>(d.number));
    auto begin = static_cast<size_t>(info.at("data_offsets").items.at(0).number);
    auto end = static_cast<size_t>(info.at("data_offsets").items.at(1).number);
    auto t = torch::empty(shape, torch::TensorOptions().dtype(dt->second));
    if (end > available || begin > end || end - begin != t.nbytes())
      throw std::runtime_error(path + ": tensor " + name + " has data that does not match its shape");
    std::memcpy(t.data_ptr(), data + begin, end - begin);
    out.emplace(name, t);
  }
  return out;
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
  std::string header = "{";
  size_t offset = 0;
  std::vector<torch::Tensor> ready;
  for (const auto& [name, tensor] : tensors) {
    auto t = tensor.to(torch::kCPU).contiguous();
    std::string code;
    for (const auto& [k, v] : dtypes())
      if (v == t.scalar_type()) code = k;
    if (code.empty()) throw std::runtime_error("output " + name + " has a dtype safetensors cannot hold");
    std::string shape;
    for (auto d : t.sizes()) shape += (shape.empty() ? "" : ",") + std::to_string(d);
    header += (ready.empty() ? "\"" : ",\"") + name + "\":{\"dtype\":\"" + code + "\",\"shape\":[" + shape +
              "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.nbytes()) + "]}";
    offset += t.nbytes();
    ready.push_back(t);
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string tmp = path + ".partial";  // no half-written output under the real name
  {
    std::ofstream f(tmp, std::ios::binary);
    uint64_t n = header.size();
    for (int k = 0; k < 8; ++k) f.put(static_cast<char>((n >> (8 * k)) & 0xff));
    f << header;
    for (const auto& t : ready) f.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    if (!f) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot write " + path);
}

// ---- the model ----
using Model = std::function<std::vector<torch::Tensor>(const std::vector<torch::Tensor>&)>;

#ifdef TORCHSHIP_WITH_OPENVINO
ov::element::Type ov_type(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return ov::element::f32;
    case torch::kFloat16: return ov::element::f16;
    case torch::kFloat64: return ov::element::f64;
    case torch::kInt64: return ov::element::i64;
    case torch::kInt32: return ov::element::i32;
    case torch::kInt8: return ov::element::i8;
    case torch::kUInt8: return ov::element::u8;
    case torch::kBool: return ov::element::boolean;
    default: throw std::runtime_error("an input dtype OpenVINO is not given here");
  }
}

torch::ScalarType torch_type(const ov::element::Type& t) {
  if (t == ov::element::f32) return torch::kFloat32;
  if (t == ov::element::f16) return torch::kFloat16;
  if (t == ov::element::bf16) return torch::kBFloat16;
  if (t == ov::element::f64) return torch::kFloat64;
  if (t == ov::element::i64) return torch::kInt64;
  if (t == ov::element::i32) return torch::kInt32;
  if (t == ov::element::i8) return torch::kInt8;
  if (t == ov::element::u8) return torch::kUInt8;
  if (t == ov::element::boolean) return torch::kBool;
  throw std::runtime_error("an output type torchship-run does not write: " + t.get_type_name());
}

// model.xml compiled for the CPU with the manifest's threads and inference precision, as the Python Runner does
Model load_openvino(const std::string& xml, const Json& manifest) {
  auto core = std::make_shared<ov::Core>();
  std::string precision = "f32";
  if (const Json* p = manifest.at("artifact").at("options").find("precision"); p && p->kind == Json::String)
    precision = p->text == "bf16" ? "bf16" : p->text == "fp16" ? "f16" : "f32";
  ov::AnyMap config{{ov::hint::inference_precision.name(), ov::element::Type(precision)},
                    {ov::hint::performance_mode.name(), ov::hint::PerformanceMode::LATENCY},
                    {ov::num_streams.name(), ov::streams::Num(1)}};
  if (const Json* threads = manifest.find("threads"); threads && threads->kind == Json::Number)
    config[ov::inference_num_threads.name()] = static_cast<int>(threads->number);
  auto compiled = std::make_shared<ov::CompiledModel>(core->compile_model(xml, "CPU", config));
  auto request = std::make_shared<ov::InferRequest>(compiled->create_infer_request());
  return [core, compiled, request](const std::vector<torch::Tensor>& in) {
    for (size_t k = 0; k < in.size(); ++k) {
      torch::Tensor t = in[k].contiguous();
      ov::Shape shape(t.sizes().begin(), t.sizes().end());
      request->set_input_tensor(k, ov::Tensor(ov_type(t.scalar_type()), shape, t.data_ptr()));
    }
    request->infer();
    std::vector<torch::Tensor> out;
    for (size_t k = 0; k < compiled->outputs().size(); ++k) {
      ov::Tensor r = request->get_output_tensor(k);
      const ov::Shape shape = r.get_shape();  // one vector: begin() and end() of the same object
      std::vector<int64_t> sizes(shape.begin(), shape.end());
      out.push_back(torch::from_blob(r.data(), sizes, torch::TensorOptions().dtype(torch_type(r.get_element_type()))).clone());
    }
    return out;
  };
}
#endif

Model load_model(const std::string& root, const Json& manifest) {
  const std::string runtime = manifest.at("runtime").text;
  const std::string file = root + "/" + manifest.at("artifact").at("files").items.at(0).text;
  if (runtime == "aoti") {
    auto loader = std::make_shared<torch::inductor::AOTIModelPackageLoader>(file);
    return [loader](const std::vector<torch::Tensor>& in) { return loader->run(in); };
  }
  if (runtime == "torchscript") {
    auto module = std::make_shared<torch::jit::Module>(torch::jit::load(file));
    module->eval();
    return [module](const std::vector<torch::Tensor>& in) {
      std::vector<torch::jit::IValue> args(in.begin(), in.end());
      auto result = module->forward(args);
      std::vector<torch::Tensor> out;
      if (result.isTuple())
        for (const auto& v : result.toTupleRef().elements()) out.push_back(v.toTensor());
      else if (result.isTensorList())
        for (const auto& v : result.toTensorVector()) out.push_back(v);
      else
        out.push_back(result.toTensor());
      return out;
    };
  }
#ifdef TORCHSHIP_WITH_OPENVINO
  if (runtime == "openvino") return load_openvino(file, manifest);
  const std::string loads = "aoti, torchscript and openvino";
#else
  const std::string loads = "aoti and torchscript (built without OpenVINO)";
#endif
  throw std::runtime_error("this bundle runs on \"" + runtime + "\"; torchship-run loads " + loads +
                           " bundles: build one with `torchship optimize SOURCE --runtimes aoti`");
}

int run(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: torchship-run BUNDLE_DIR INPUTS.safetensors OUTPUTS.safetensors [--repeat N]\n";
    return 2;
  }
  const std::string root = argv[1];
  int repeat = 1;
  if (argc >= 6 && std::string(argv[4]) == "--repeat") repeat = std::max(1, std::stoi(argv[5]));
  Json manifest = Parser(read_file(root + "/manifest.json")).parse();
  if (const Json* threads = manifest.find("threads"); threads && threads->kind == Json::Number)
    torch::set_num_threads(static_cast<int>(threads->number));
  auto feeds = read_safetensors(argv[2]);
  std::vector<torch::Tensor> inputs;
  for (const auto& spec : manifest.at("spec").at("inputs").items) {
    const std::string name = spec.at("name").text;
    auto it = feeds.find(name);
    if (it == feeds.end()) throw std::runtime_error(std::string(argv[2]) + " has no tensor named \"" + name + "\" (the bundle's input)");
    inputs.push_back(it->second);
  }
  Model model = load_model(root, manifest);
  c10::InferenceMode guard;
  std::vector<torch::Tensor> outputs;
  auto start = std::chrono::steady_clock::now();
  for (int k = 0; k < repeat; ++k) outputs = model(inputs);
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / repeat;
  const auto& names = manifest.at("spec").at("outputs").items;
  if (outputs.size() != names.size())
    throw std::runtime_error("the model returned " + std::to_string(outputs.size()) + " outputs, the manifest names " +
                             std::to_string(names.size()));
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (size_t k = 0; k < outputs.size(); ++k) named.emplace_back(names[k].at("name").text, outputs[k]);
  write_safetensors(argv[3], named);
  std::cout << manifest.at("runtime").text << ": " << inputs.at(0).size(0) << " items, " << ms << " ms per run\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "torchship-run: " << e.what() << "\n";
    return 1;
  }
}
