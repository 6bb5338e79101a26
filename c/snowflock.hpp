// snowflock.hpp: the SnowFlock API for C++17 programs inside a guest VM, header-only
// over libsnowflock (snowflock.h; link with -lsnowflock). See snowflock(3).
//
// The calls are the C calls (same protocol, threads, hooks and reseed, no
// avoidance); a failure throws snowflock::Error, which carries the exit code of
// the tools (SF_ENOTFOUND, ...) instead of returning its negative.
//
//     auto ticket = snowflock::request_ticket(4);
//     int id = ticket.clone();
//     if (id > 0) { work(id); snowflock::exit(0); }
//     for (const auto& c : ticket.join()) std::cout << c.id << ' ' << c.state << '\n';
#ifndef SNOWFLOCK_HPP
#define SNOWFLOCK_HPP

#include <cerrno>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "snowflock.h"

namespace snowflock {

// A failed call: what() is "sf_join: no such ticket or checkpoint"; code() the exit
// code (1 <= code: SF_EUSAGE, SF_ENOTFOUND, ...); sys_errno() the errno the call
// left (meaningful for SF_ESYSTEM).
class Error : public std::runtime_error {
public:
    // err defaults to errno as the call left it, read before the message is built.
    Error(const std::string& call, int code, int err = errno)
        : std::runtime_error(call + ": " + sf_strerror(code)),
          code_(code < 0 ? -code : code), errno_(err) {}

    int code() const noexcept { return code_; }
    int sys_errno() const noexcept { return errno_; }

private:
    int code_;
    int errno_;
};

namespace detail {
inline int check(const char* call, int rc)
{
    if (rc < 0)
        throw Error(call, rc);
    return rc;
}
} // namespace detail

// One clone of a joined or killed ticket.
struct CloneStatus {
    int id;            // 1..granted
    std::string state; // "exited", "killed", "crashed" (or "running")
    int status;        // what it passed to exit(); -1 if it did not exit
};

// What checkpoint_parent() returns: the checkpoint's ID, and 0 now or a clone's ID
// in each clone made from it later.
struct Checkpoint {
    std::string id;
    int clone_id;
};

// A ticket for clones, owned by one object: move-only, so that one owner joins or
// kills it. join() and kill() use it up (valid() is false after them, and after a
// move); using it then throws Error with SF_EUSAGE.
//
// The destructor does nothing: it neither kills nor joins. A destructor cannot
// report a failure, and every clone of this VM holds a copy of the object too, whose
// end must not end the family. A ticket dropped unused is left to sfld as it is (as
// an sf_ticket_t would be); end it explicitly with join() or kill().
class Ticket {
public:
    explicit Ticket(const sf_ticket_t& t) noexcept : t_(t), valid_(true) {}
    Ticket(Ticket&& other) noexcept : t_(other.t_), valid_(other.valid_) { other.valid_ = false; }
    Ticket& operator=(Ticket&& other) noexcept
    {
        t_ = other.t_;
        valid_ = std::exchange(other.valid_, false);
        return *this;
    }
    Ticket(const Ticket&) = delete;
    Ticket& operator=(const Ticket&) = delete;
    ~Ticket() = default; // see above: nothing that could fail silently

    std::string id() const { return t_.id; }
    int granted() const noexcept { return t_.granted; }
    int requested() const noexcept { return t_.requested; }
    bool valid() const noexcept { return valid_; }
    const sf_ticket_t& get() const noexcept { return t_; } // for the C calls

    // Clones this VM: 0 in the parent, the clone's ID in each clone.
    int clone() const { return detail::check("sf_clone", sf_clone(held("sf_clone"))); }

    // Waits until every clone has ended; their statuses, sorted by ID.
    std::vector<CloneStatus> join()
    {
        std::vector<sf_clone_status_t> out(t_.granted > 0 ? t_.granted : 1);
        int n = detail::check("sf_join", sf_join(held("sf_join"), out.data(),
                                                 static_cast<int>(out.size())));
        valid_ = false;
        std::vector<CloneStatus> clones;
        for (int k = 0; k < n && k < static_cast<int>(out.size()); k++)
            clones.push_back({out[k].id, out[k].state, out[k].status});
        return clones;
    }

    // Kills every clone still running; how many were.
    int kill()
    {
        int n = detail::check("sf_kill", sf_kill(held("sf_kill")));
        valid_ = false;
        return n;
    }

private:
    const sf_ticket_t* held(const char* call) const
    {
        if (!valid_) {
            errno = 0;
            throw Error(call, -SF_EUSAGE);
        }
        return &t_;
    }

    sf_ticket_t t_;
    bool valid_;
};

// Reserves n clones; the ticket may grant fewer.
inline Ticket request_ticket(int n)
{
    sf_ticket_t t;
    detail::check("sf_request_ticket", sf_request_ticket(n, &t));
    return Ticket(t);
}

inline int clone(const Ticket& t) { return t.clone(); }

inline Checkpoint checkpoint_parent()
{
    char id[SF_ID_MAX];
    int clone_id = detail::check("sf_checkpoint_parent", sf_checkpoint_parent(id, sizeof id));
    return {id, clone_id};
}

// Clones from checkpoint with t; they return from checkpoint_parent().
inline void create_clones(const std::string& checkpoint, const Ticket& t)
{
    if (!t.valid()) {
        errno = 0;
        throw Error("sf_create_clones", -SF_EUSAGE);
    }
    detail::check("sf_create_clones", sf_create_clones(checkpoint.c_str(), &t.get()));
}

// Ends this clone with status (0-255); never returns (see sf_exit: if sfld refuses,
// the process exits with the error's code, no exception is thrown).
[[noreturn]] inline void exit(int status) { sf_exit(status); }

inline std::vector<CloneStatus> join(Ticket& t) { return t.join(); }
inline int kill(Ticket& t) { return t.kill(); }

} // namespace snowflock

#endif
