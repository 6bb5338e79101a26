// sf-cxxtest: the C++ API (snowflock.hpp) on a real VM (tests/integration/test_c_api.py)
// and against a fake sfld behind the real agent (tests/integration/test_c_agent.py).
//
// 1. Errors are exceptions with the exit code: join of a made-up ticket (3),
//    request_ticket(0) (2), a moved-from ticket (2, no request made).
// 2. request_ticket(2), clone: each clone prints "CXX-CLONE ID" and exits ID + 30;
//    the parent joins and prints "CXX-JOIN ID STATE STATUS" lines.
// Then the verdict: "CXX-TEST PASS", or "CXX-TEST FAIL: reason". Exits 0 or 1.
// With the argument "more" (against the fake sfld only, which forks nothing), the
// other calls instead: checkpoint_parent, create_clones and kill, and the errors of
// a used-up ticket. With "bench N [TICKET]" (bench/guest_bench.py): N joins of
// TICKET (default t999-nosuch), each one round trip whatever its outcome, then
// "MEAN-MS X".
#include "snowflock.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

namespace {

constexpr int kClones = 2;

bool fail(const std::string& why)
{
    std::cout << "CXX-TEST FAIL: " << why << std::endl;
    return false;
}

// Whether call throws snowflock::Error with code.
template <typename F> bool throws(F call, int code, const std::string& what)
{
    try {
        call();
    } catch (const snowflock::Error& e) {
        if (e.code() == code)
            return true;
        return fail(what + " threw code " + std::to_string(e.code()) + ": " + e.what());
    }
    return fail(what + " did not throw");
}

bool check_errors()
{
    sf_ticket_t made_up = {"t999-nosuch", 1, 1};
    snowflock::Ticket unknown(made_up), moved(made_up);
    snowflock::Ticket owner(std::move(moved));

    return throws([&] { unknown.join(); }, SF_ENOTFOUND, "join of a made-up ticket") &&
           throws([] { snowflock::request_ticket(0); }, SF_EUSAGE, "request_ticket(0)") &&
           throws([&] { moved.kill(); }, SF_EUSAGE, "kill of a moved-from ticket") &&
           owner.valid() && !moved.valid();
}

bool check_clone_and_join()
{
    snowflock::Ticket t = snowflock::request_ticket(kClones);
    if (t.granted() != kClones)
        return fail("granted " + std::to_string(t.granted()) + " clones");
    int id = t.clone();
    if (id > 0) {
        std::cout << "CXX-CLONE " << id << std::endl;
        snowflock::exit(id + 30);
    }
    auto clones = snowflock::join(t);
    bool ok = clones.size() == kClones && !t.valid();
    for (std::size_t k = 0; k < clones.size(); k++) {
        const auto& c = clones[k];
        std::cout << "CXX-JOIN " << c.id << ' ' << c.state << ' ' << c.status << std::endl;
        ok = ok && c.id == static_cast<int>(k) + 1 && c.state == "exited" && c.status == c.id + 30;
    }
    return ok || fail("clones 1 and 2 should exit 31 and 32");
}

bool check_more_calls()
{
    auto ckpt = snowflock::checkpoint_parent();
    if (ckpt.clone_id != 0 || ckpt.id.empty())
        return fail("checkpoint_parent gave " + ckpt.id + " " + std::to_string(ckpt.clone_id));
    snowflock::Ticket t = snowflock::request_ticket(kClones);
    snowflock::create_clones(ckpt.id, t);
    int killed = snowflock::kill(t);
    std::cout << "CXX-CKPT " << ckpt.id << " CXX-KILLED " << killed << std::endl;
    return (killed == kClones || fail("kill killed " + std::to_string(killed))) &&
           throws([&] { t.kill(); }, SF_EUSAGE, "a second kill") &&
           throws([&] { snowflock::create_clones(ckpt.id, t); }, SF_EUSAGE,
                  "create_clones with a used-up ticket") &&
           throws([&] { snowflock::create_clones("c9-nosuch", snowflock::request_ticket(1)); },
                  SF_ENOTFOUND, "create_clones from a made-up checkpoint");
}

// N joins of ticket id, timed; an error (an unknown ticket) is one round trip too.
int bench(int n, const char* id)
{
    sf_ticket_t named = {"", 1, 1};
    std::snprintf(named.id, sizeof named.id, "%s", id);
    auto started = std::chrono::steady_clock::now();
    for (int i = 0; i < n; i++) {
        snowflock::Ticket t(named);
        try {
            t.join();
        } catch (const snowflock::Error& e) {
            if (e.code() != SF_ENOTFOUND && e.code() != SF_EUSAGE)
                return fail(std::string("join: ") + e.what()), 1;
        }
    }
    std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - started;
    std::cout << "MEAN-MS " << took.count() / n << std::endl;
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc > 2 && std::string(argv[1]) == "bench") {
        int n = std::atoi(argv[2]);
        if (n <= 0) {
            std::cerr << "usage: sf-cxxtest bench N [TICKET]" << std::endl;
            return 2;
        }
        return bench(n, argc > 3 ? argv[3] : "t999-nosuch");
    }
    bool more = argc > 1 && std::string(argv[1]) == "more";

    try {
        if (more ? !check_more_calls() : !check_errors() || !check_clone_and_join())
            return 1;
    } catch (const snowflock::Error& e) {
        fail(std::string(e.what()) + " (code " + std::to_string(e.code()) + ")");
        return 1;
    }
    std::cout << "CXX-TEST PASS" << std::endl;
    return 0;
}
