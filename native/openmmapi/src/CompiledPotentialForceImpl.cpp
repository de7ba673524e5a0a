#include "flowforce/internal/CompiledPotentialForceImpl.h"
#include "openmm/OpenMMException.h"
#include "openmm/System.h"
#include "openmm/internal/ContextImpl.h"
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <map>
#include <mutex>

using namespace FlowForcePlugin;
using OpenMM::OpenMMException;
using OpenMM::Vec3;

namespace {

// Loading a package unpacks it and probes the CPU's instruction set (seconds), so loaders are
// shared by every Context of the process that runs the same bytes on the same device. The key is
// the content hash, not the path: a file replaced under the same name gets a fresh loader.
std::shared_ptr<torch::inductor::AOTIModelPackageLoader> sharedLoader(const std::string& path,
                                                                      const std::string& sha256,
                                                                      const std::string& device) {
    static std::mutex mutex;
    static std::map<std::string, std::shared_ptr<torch::inductor::AOTIModelPackageLoader>> loaders;
    std::lock_guard<std::mutex> lock(mutex);
    const std::string key = sha256 + "/" + device;
    auto found = loaders.find(key);
    if (found != loaders.end())
        return found->second;
    // CUDA packages run on cuda:0 only (AOTInductor's loader); CPU packages take device index -1.
    auto loader = std::make_shared<torch::inductor::AOTIModelPackageLoader>(path, "model", false, 1,
                                                                            device == "cuda" ? 0 : -1);
    loaders[key] = loader;
    return loader;
}

std::string firstLine(const std::string& text) {
    return text.substr(0, text.find('\n'));
}

} // namespace

CompiledPotentialForceImpl::CompiledPotentialForceImpl(const CompiledPotentialForce& owner)
    : CustomCPPForceImpl(owner), owner(owner) {}

CompiledPotentialForceImpl::~CompiledPotentialForceImpl() = default;

void CompiledPotentialForceImpl::initialize(OpenMM::ContextImpl& context) {
    CustomCPPForceImpl::initialize(context);
    const int numSystemParticles = context.getSystem().getNumParticles();
    const int n = owner.getNumModelParticles();
    particles = owner.getParticles();
    if (particles.empty()) {
        if (n > numSystemParticles)
            throw OpenMMException("CompiledPotentialForce: the model covers " + std::to_string(n) +
                                  " particles but the System has " + std::to_string(numSystemParticles));
        for (int i = 0; i < n; i++)
            particles.push_back(i);
    }
    for (int p : particles)
        if (p >= numSystemParticles)
            throw OpenMMException("CompiledPotentialForce: particle index " + std::to_string(p) +
                                  " is out of range for a System of " + std::to_string(numSystemParticles) +
                                  " particles");
    const std::string actual = sha256OfFile(owner.getPackagePath());
    if (actual != owner.getPackageSha256())
        throw OpenMMException("CompiledPotentialForce: the package '" + owner.getPackagePath() +
                              "' has changed since this force was created (SHA-256 " + actual + ", expected " +
                              owner.getPackageSha256() + "); refusing to run it. Rebuild the System from the "
                              "package you mean to use.");
    onCuda = owner.getDevice() == "cuda";
    dtype = owner.getDtype() == "float64" ? at::kDouble : at::kFloat;
    try {
        loader = sharedLoader(owner.getPackagePath(), actual, owner.getDevice());
    } catch (const std::exception& error) {
        throw OpenMMException("CompiledPotentialForce: cannot load the package '" + owner.getPackagePath() +
                              "': " + firstLine(error.what()));
    }
    hostPositions = at::zeros({n, 3}, at::TensorOptions().dtype(at::kDouble));
}

double CompiledPotentialForceImpl::computeForce(OpenMM::ContextImpl& context, const std::vector<Vec3>& positions,
                                                std::vector<Vec3>& forces) {
    c10::InferenceMode guard;
    const int n = static_cast<int>(particles.size());
    double* staged = hostPositions.data_ptr<double>();
    for (int i = 0; i < n; i++) {
        const Vec3& r = positions[particles[i]];
        staged[3 * i] = r[0];
        staged[3 * i + 1] = r[1];
        staged[3 * i + 2] = r[2];
    }
    at::Tensor input = hostPositions.to(dtype);
    if (onCuda)
        input = input.to(at::Device(at::kCUDA, 0));
    std::vector<at::Tensor> outputs;
    try {
        outputs = loader->run({input});
    } catch (const std::exception& error) {
        throw OpenMMException("CompiledPotentialForce: the package '" + owner.getPackagePath() +
                              "' failed to run: " + firstLine(error.what()));
    }
    if (outputs.size() != 2 || outputs[0].numel() != 1 || outputs[1].numel() != 3 * n)
        throw OpenMMException("CompiledPotentialForce: the package '" + owner.getPackagePath() +
                              "' does not follow the (energy, forces (n, 3)) contract; re-export it with "
                              "`flowforce export --compile`");
    const at::Tensor result = outputs[1].to(at::kCPU, at::kDouble).contiguous();
    const double* f = result.data_ptr<double>();
    std::fill(forces.begin(), forces.end(), Vec3());
    for (int i = 0; i < n; i++)
        forces[particles[i]] = Vec3(f[3 * i], f[3 * i + 1], f[3 * i + 2]);
    return outputs[0].to(at::kCPU, at::kDouble).item<double>();
}
