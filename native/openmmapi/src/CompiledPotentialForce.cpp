#include "flowforce/CompiledPotentialForce.h"
#include "flowforce/internal/CompiledPotentialForceImpl.h"
#include "openmm/OpenMMException.h"
#include <set>

using namespace FlowForcePlugin;
using OpenMM::OpenMMException;

CompiledPotentialForce::CompiledPotentialForce(const std::string& packagePath, const std::string& sha256,
                                               int numModelParticles, const std::string& dtype,
                                               const std::string& device)
    : packagePath(packagePath), sha256(sha256.empty() ? sha256OfFile(packagePath) : sha256), dtype(dtype),
      device(device), numModelParticles(numModelParticles) {
    if (numModelParticles < 1)
        throw OpenMMException("CompiledPotentialForce: the model must cover at least one particle, got " +
                              std::to_string(numModelParticles));
    if (dtype != "float32" && dtype != "float64")
        throw OpenMMException("CompiledPotentialForce: dtype must be float32 or float64, got '" + dtype + "'");
    if (device != "cpu" && device != "cuda")
        throw OpenMMException("CompiledPotentialForce: device must be cpu or cuda, got '" + device + "'");
    if (this->sha256.size() != 64 || this->sha256.find_first_not_of("0123456789abcdef") != std::string::npos)
        throw OpenMMException("CompiledPotentialForce: sha256 must be 64 lower-case hex digits, got '" + sha256 + "'");
}

void CompiledPotentialForce::setParticles(const std::vector<int>& newParticles) {
    if (!newParticles.empty()) {
        if ((int) newParticles.size() != numModelParticles)
            throw OpenMMException("CompiledPotentialForce: the model covers " + std::to_string(numModelParticles) +
                                  " particles, got " + std::to_string(newParticles.size()) + " particle indices");
        std::set<int> seen;
        for (int p : newParticles) {
            if (p < 0)
                throw OpenMMException("CompiledPotentialForce: negative particle index " + std::to_string(p));
            if (!seen.insert(p).second)
                throw OpenMMException("CompiledPotentialForce: particle " + std::to_string(p) + " is listed twice");
        }
    }
    particles = newParticles;
}

OpenMM::ForceImpl* CompiledPotentialForce::createImpl() const {
    return new CompiledPotentialForceImpl(*this);
}
